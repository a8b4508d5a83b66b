"""Stage ``engine-<precision>``: a TensorRT engine per module, through Polygraphy's loaders.

Source graphs carry their precision: ``int8/`` (Q/DQ + FP16 islands), ``fp16/``, or the FP32
``optimized/`` graph for ``fp32``. TensorRT >= 10.12 builds them as strongly typed networks;
8.5-10.11 build the same graphs in flag mode (FP16 flag; INT8+FP16 flags for Q/DQ graphs). Profiles come from
:mod:`autoglm_build.engine.profiles`; the timing cache persists across builds in the cache dir.

Imports on the GPU harness's Python 3.9 without torch.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from autoglm_build.engine import tensorrt as trt_env
from autoglm_build.engine.profiles import PROFILE_NAMES, profiles
from autoglm_build.engine.sidecar import Sidecar
from autoglm_build.errors import UserError
from autoglm_build.manifest import sha256_file
from autoglm_build.stages.base import Stage, StageContext, StageResult

ENGINE_DIR = "engines"
SOURCES = {
    "int8": ("calibrate-int8", "onnx-int8"),
    "fp16": ("calibrate-fp16", "onnx-fp16"),
    "fp32": ("optimize", "onnx"),
}


def source_graph(ctx: StageContext, module: str, precision: str) -> Path:
    from autoglm_build.stages.calibrate import fp32_artifacts

    stage, kind = SOURCES[precision]
    if precision == "fp32":
        arts = fp32_artifacts(ctx.manifest, module, kind=kind)
    else:
        arts = ctx.manifest.artifacts_of(stage, module, kind=kind)
    if not arts:
        raise UserError(f"{module}: no {precision} graph in {ctx.workdir}",
                        hint=f"run `autoglm-build {'calibrate --' + precision if precision != 'fp32' else 'optimize'}`")
    return ctx.build.check(arts[0])  # inside the workdir, the recorded bytes


class EngineStage(Stage):
    """Build ``engines/<module>.<precision>.engine`` and its sidecar.

    Args:
        precision: fp16 | int8 | fp32.
        max_batch, opt_batch: the batch profile (default from ``engine:``).
    """

    version = 1
    tools = ("onnx", "polygraphy")

    def __init__(self, precision: str, max_batch: Optional[int] = None, opt_batch: Optional[int] = None) -> None:
        self.precision = precision
        self.name = f"engine-{precision}"
        self.max_batch, self.opt_batch = max_batch, opt_batch

    def batches(self, ctx: StageContext):
        g = ctx.cfg.engine
        max_batch = self.max_batch or g.max_batch
        opt_batch = min(self.opt_batch or g.opt_batch, max_batch)
        if max_batch > ctx.cfg.export.max_batch:
            raise UserError(f"--max-batch: {max_batch} exceeds the exported graphs' batch bound "
                            f"export.max_batch={ctx.cfg.export.max_batch}")
        return max_batch, opt_batch

    def fingerprint_data(self, ctx: StageContext, module: str) -> Dict[str, Any]:
        trt = trt_env.load()
        source = source_graph(ctx, module, self.precision)
        return {
            "module": module,
            "source": sha256_file(source),
            "batches": self.batches(ctx),
            "engine": ctx.cfg.section("engine"),
            "tensorrt": trt.__version__,
            "gpu": trt_env.gpu()["compute_capability"],
            "tactics": os.environ.get("AUTOGLM_BUILD_TRT_TACTICS", "default"),
        }

    def __call__(self, ctx: StageContext, module: str) -> StageResult:
        trt = trt_env.load()
        gpu = trt_env.gpu()
        source = source_graph(ctx, module, self.precision)
        max_batch, opt_batch = self.batches(ctx)
        shapes = profiles(ctx.cfg, source, max_batch, opt_batch)
        cache = self.timing_cache(ctx, trt.__version__, gpu["compute_capability"], module)
        cache_hit = cache.is_file()
        ctx.status(f"building ({'strongly typed' if trt_env.strongly_typed(trt) else 'flag mode'}, TensorRT "
                   f"{trt.__version__}, timing cache {'found' if cache_hit else 'cold'})")
        start = time.perf_counter()
        with for_this_tensorrt(trt, source, ctx.workdir) as (parsed, adapted):
            engine_bytes = build_isolated(parsed, self.precision, shapes, ctx.cfg.engine.workspace_mib, cache,
                                          ctx.workdir, ctx.cfg.engine.preview_features, ctx.status)
        seconds = time.perf_counter() - start
        final_dir = ctx.workdir / ENGINE_DIR
        final_dir.mkdir(parents=True, exist_ok=True)
        engine = final_dir / f"{module}.{self.precision}.engine"
        with tempfile.NamedTemporaryFile(dir=final_dir, prefix=f".{engine.name}.", delete=False) as fh:
            fh.write(engine_bytes)
        tmp = Path(fh.name)
        sidecar = Sidecar(
            module=module, precision=self.precision, tensorrt_version=trt.__version__,
            strongly_typed=trt_env.strongly_typed(trt), gpu_name=gpu["name"],
            compute_capability=gpu["compute_capability"],
            profiles=[{n: [list(s) for s in t] for n, t in p.items()} for p in shapes],
            profile_names=list(PROFILE_NAMES[: len(shapes)]) if len(shapes) > 1 else ["default"],
            source_onnx=str(source.relative_to(ctx.workdir)), source_onnx_sha256=sha256_file(source),
            build_seconds=round(seconds, 2), engine_bytes=len(engine_bytes), engine_sha256=sha256_file(tmp),
            timing_cache=str(cache),
        )
        tmp.replace(engine)
        side = sidecar.write(engine)
        metrics = {"build_s": round(seconds, 2), "timing_cache_found": cache_hit, "engine_bytes": len(engine_bytes),
                   "profiles": len(shapes), "tensorrt": trt.__version__, "gpu": gpu, "rewrites_for_tensorrt": adapted}
        return StageResult(outputs=[(engine, "engine"), (side, "engine-sidecar")],
                           params={"precision": self.precision, "max_batch": max_batch, "opt_batch": opt_batch},
                           metrics=metrics)

    def timing_cache(self, ctx: StageContext, version: str, cc: str, module: str) -> Path:
        """One cache per TensorRT version, GPU architecture, module and precision.

        TensorRT 8.5 cannot merge a timing cache holding another network's Myelin graphs ("Myelin
        error from unknown graph ... The timing cache will not be used!", seen on the device), so
        a cache shared across modules would be thrown away on every build.
        """
        name = f"timing-trt{version}-sm{cc.replace('.', '')}-{module}-{self.precision}.cache"
        if ctx.cfg.engine.timing_cache:
            return Path(ctx.cfg.engine.timing_cache) / name
        path = trt_env.cache_dir() / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


@contextlib.contextmanager
def for_this_tensorrt(trt: Any, source: Path, workdir: Path):
    """The graph the running TensorRT can parse: ``source`` itself, or a temp copy with the rewrites
    an older parser needs (LayerNormalization below 8.6). Yields (path, rewrites applied).

    The copy is only made where the graph has a LayerNormalization (read without its weights first):
    the 9B decoder's stages have none (RMSNorm), and a copy of each of its 2 GB FP16 stages, built
    eight at once, cost the lease disk and time for nothing."""
    if trt_env.version_tuple(trt.__version__) >= (8, 6):
        yield source, {}
        return
    import onnx

    from autoglm_build.onnx_io import save_model
    from autoglm_build.rewrites import DecomposeLayerNorm

    if not any(node.op_type == "LayerNormalization"
               for node in onnx.load(str(source), load_external_data=False).graph.node):
        yield source, {DecomposeLayerNorm.name: 0}
        return
    model = onnx.load(str(source))
    model, count = DecomposeLayerNorm()(model)
    with tempfile.TemporaryDirectory(dir=workdir, prefix=".trt-parse-") as tmp:
        files = save_model(model, Path(tmp) / source.name, 1 << 30)
        del model
        yield files[0], {DecomposeLayerNorm.name: count}


def build_isolated(source: Path, precision: str, shapes: List[Dict], workspace_mib: int, cache: Path,
                   workdir: Path, preview: Optional[List[str]] = None,
                   status: Callable[[str], None] = lambda message: None, device: Optional[int] = None) -> bytes:
    """:func:`build` in a child process: a TensorRT abort (TensorRT 8.5's Myelin ``DCHECK`` on some
    Q/DQ graphs, seen on the device) becomes a one-line error instead of killing the tool.

    The child reports back through a queue: ``status`` receives TensorRT >= 10's progress monitor
    phases as they happen; a user-fixable error comes back as one (exit code kept), any other
    exception as a :class:`BuildChildError` carrying the child's traceback. ``device``: the GPU the child builds on
    (made current there; None: the current one, GPU 0 in a new process).
    """
    import multiprocessing
    import queue as queue_mod

    spawn = multiprocessing.get_context("spawn")
    messages = spawn.Queue()
    with tempfile.TemporaryDirectory(dir=workdir, prefix=".engine-build-") as tmp:
        out = Path(tmp) / "engine.bin"
        child = spawn.Process(target=_build_child, args=(str(source), precision, shapes, workspace_mib, str(cache),
                                                         str(out), messages, preview, device))
        child.start()
        failure = None
        while True:
            try:
                kind, payload = messages.get(timeout=0.2)
            except queue_mod.Empty:
                if child.is_alive():
                    continue
                try:  # the child may have put its last message just before exiting
                    kind, payload = messages.get(timeout=0.5)
                except queue_mod.Empty:
                    break
            if kind == "status":
                status(payload)
            else:
                failure = (kind, payload)
        child.join()
        if failure is not None:
            _raise_child_failure(*failure)
        if child.exitcode != 0 or not out.is_file():
            raise UserError(f"{source}: TensorRT aborted while building the {precision} engine "
                            f"({_exit_description(child.exitcode)}); its log is above",
                            hint="a TensorRT bug or an unsupported pattern: try another precision or TensorRT version")
        return out.read_bytes()


class BuildChildError(RuntimeError):
    """An unexpected exception in the build child (a bug): the child's traceback is in the message."""


def _raise_child_failure(kind: str, payload: Dict[str, Any]) -> None:
    if kind == "user-error":
        error = UserError(payload["message"], hint=payload.get("hint"))
        error.exit_code = payload.get("exit_code", error.exit_code)
        raise error
    raise BuildChildError(f"the engine build child failed: {payload['type']}: {payload['message']}\n"
                          f"--- traceback in the build child ---\n{payload['traceback']}")


def _exit_description(code: Optional[int]) -> str:
    if code is not None and code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _build_child(source: str, precision: str, shapes: List[Dict], workspace_mib: int, cache: str, out: str,
                 messages: Any, preview: Optional[List[str]] = None, device: Optional[int] = None) -> None:
    """The child's whole body is inside the ``try``: whatever fails is reported, never 'aborted'."""
    import traceback

    try:
        if device is not None:  # the GPU current before TensorRT starts (its first CUDA call makes the context)
            import ctypes

            from polygraphy import cuda

            lib = cuda.wrapper().handle
            for call, status in (("cudaSetDevice", lib.cudaSetDevice(ctypes.c_int(device))),
                                 ("cudaFree(NULL)", lib.cudaFree(ctypes.c_void_p(0)))):
                if status:
                    raise RuntimeError(f"{call} for GPU {device}: CUDA error {status}")
        trt = trt_env.load()
        data = build(trt, Path(source), precision, shapes, workspace_mib, Path(cache),
                     lambda message: messages.put(("status", message)), preview)
        Path(out).write_bytes(data)
    except UserError as exc:
        messages.put(("user-error", {"message": exc.message, "hint": exc.hint, "exit_code": exc.exit_code}))
    except Exception as exc:
        messages.put(("exception", {"type": type(exc).__name__, "message": str(exc),
                                    "traceback": traceback.format_exc()}))
    finally:
        messages.close()
        messages.join_thread()  # everything put is flushed before the child exits


TACTICS = ("default", "none", "cublas")


def tactic_sources(trt: Any, setting: str) -> Optional[List[Any]]:
    """``AUTOGLM_BUILD_TRT_TACTICS`` as TensorRT tactic sources (None: TensorRT's default).

    ``none``: no external tactic sources (the GPU harness's stubbed cuBLAS/cuDNN). ``cublas``: cuBLAS
    and cuBLAS LT but no cuDNN (the harness with real cuBLAS, cuDNN still stubbed); TensorRT 11 has
    neither cuBLAS nor cuDNN tactic sources (its kernels are its own), so there it means the default.

    Raises:
        UserError: an unknown setting.
    """
    if setting not in TACTICS:
        raise UserError(f"AUTOGLM_BUILD_TRT_TACTICS: '{setting}' is not one of {', '.join(TACTICS)}")
    if setting == "none":
        return []
    if setting == "cublas":
        members = dict(getattr(trt.TacticSource, "__members__", {}))
        sources = [members[name] for name in ("CUBLAS", "CUBLAS_LT") if name in members]
        return sources or None
    return None


def build(trt: Any, source: Path, precision: str, shapes: List[Dict], workspace_mib: int, cache: Path,
          status, preview: Optional[List[str]] = None) -> bytes:
    """Serialized engine bytes for ``source`` (Polygraphy loaders, composed then called).

    ``AUTOGLM_BUILD_TRT_LOG=verbose`` turns on TensorRT's verbose builder log with timestamps (where a slow
    build spends its time: the long-context decoder's LM-head stage took over 11 minutes on TensorRT 8.5)."""
    import onnx
    from polygraphy import logger as polygraphy_logger
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    level = os.environ.get("AUTOGLM_BUILD_TRT_LOG", "").lower()
    if level:
        if level not in ("verbose", "info"):
            raise UserError(f"AUTOGLM_BUILD_TRT_LOG: '{level}' is not one of verbose, info")
        log = polygraphy_logger.G_LOGGER
        severity = log.VERBOSE if level == "verbose" else log.INFO
        if hasattr(log, "module_severity"):  # Polygraphy >= 0.47 (``severity`` is deprecated there)
            log.module_severity = severity
        else:
            log.severity = severity
        log.timestamp = True

    strong = trt_env.strongly_typed(trt)
    network = NetworkFromOnnxPath(str(source), strongly_typed=True) if strong else NetworkFromOnnxPath(str(source))
    graph = onnx.load(str(source), load_external_data=False).graph  # structure only: what flag mode must be told
    halves = [] if strong else fp16_outputs(graph)
    if halves:  # flag mode leaves network outputs FP32 whatever the graph says (TensorRT 8.5: the KV cache)
        from polygraphy.backend.trt import SetTensorDatatypes

        network = SetTensorDatatypes(network, {name: trt.float16 for name in halves})
    kwargs: Dict[str, Any] = {
        "profiles": [_profile(Profile(), p) for p in shapes],
        "load_timing_cache": str(cache) if cache.is_file() else None,
    }
    if hasattr(trt, "MemoryPoolType"):
        kwargs["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: workspace_mib << 20}
    sources = tactic_sources(trt, os.environ.get("AUTOGLM_BUILD_TRT_TACTICS", "default"))
    if sources is not None:
        kwargs["tactic_sources"] = sources
    if not strong:
        # An "int8" graph the precision policy left without Q/DQ (the embedding table) has no INT8
        # scales; TensorRT 8.5 refuses the INT8 flag without them ("no scaling factors detected").
        kwargs.update(fp16=precision in ("fp16", "int8"), int8=precision == "int8" and _has_qdq(graph))
    features = preview_features(trt, preview)
    if features or preview is not None:  # an explicit [] turns off what the version has on by default (8.6-9.x)
        kwargs["preview_features"] = features
    monitor = _progress_monitor(trt, status)
    if monitor is not None:
        kwargs["progress_monitor"] = monitor
    loader = EngineBytesFromNetwork(network, config=CreateConfig(**kwargs), save_timing_cache=str(cache))
    try:
        return bytes(loader())
    except Exception as exc:  # Polygraphy raises PolygraphyException with TensorRT's log above it
        raise UserError(f"{source}: TensorRT could not build the {precision} engine ({exc})",
                        hint=f"if TensorRT's log above says 'insufficient workspace' or 'insufficient memory', "
                             f"raise engine.workspace_mib (now {workspace_mib})") from None


def fp16_outputs(graph: Any) -> List[str]:
    """The graph's FP16 outputs (the decoder's ``present_*`` in its FP16 and INT8 graphs)."""
    import onnx

    return [o.name for o in graph.output if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16]


def preview_features(trt: Any, names: Optional[List[str]]) -> List[Any]:
    """TensorRT ``PreviewFeature`` members for ``engine.preview_features``.

    The default (None) is TensorRT 8.5's dynamic-shape path for transformers (the default from 8.6,
    gone in 10): without it Myelin builds the decoder's two wide profiles for many minutes.
    """
    enum = getattr(trt, "PreviewFeature", None)
    if names is None:
        faster = getattr(enum, "FASTER_DYNAMIC_SHAPES_0805", None)
        return [faster] if faster is not None and trt_env.version_tuple(trt.__version__) < (8, 6) else []
    known = dict(getattr(enum, "__members__", {}))  # pybind11 enums list their members here
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UserError(f"engine.preview_features: {', '.join(unknown)} not in TensorRT {trt.__version__}'s "
                        f"PreviewFeature ({', '.join(sorted(known)) or 'none'})")
    return [known[name] for name in names]


def _has_qdq(graph: Any) -> bool:
    return any(node.op_type == "QuantizeLinear" for node in graph.node)


def _profile(profile: Any, shapes: Dict) -> Any:
    for name, (lo, opt, hi) in shapes.items():
        profile.add(name, min=lo, opt=opt, max=hi)
    return profile


def _progress_monitor(trt: Any, status):
    """TensorRT >= 10's IProgressMonitor, reporting phases to the stage's status line."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.phases: Dict[str, tuple] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.phases[phase_name] = (0, num_steps)
            status(f"{phase_name} 0/{num_steps}")

        def step_complete(self, phase_name, step):
            total = self.phases.get(phase_name, (0, 0))[1]
            status(f"{phase_name} {step + 1}/{total}")
            return True

        def phase_finish(self, phase_name):
            self.phases.pop(phase_name, None)

    return Monitor()
