"""Run a build's modules: ONNX Runtime on its graphs, or TensorRT on its engines.

``serve`` and ``bench`` use the same objects: a :class:`Backend` loads one graph or engine per
module from the workdir's manifest (refusing files whose sha256 no longer matches it) and runs it
on numpy feeds. The decoder runs in two phases, ``prefill`` and ``decode``, which on TensorRT are
the engine's two optimization profiles (:mod:`autoglm_build.engine.profiles`), each with its own
execution context.

Imports on the GPU harness's Python 3.9 without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from autoglm_build.engine import tensorrt as trt_env
from autoglm_build.errors import UserError
from autoglm_build.manifest import Artifact, Manifest
from autoglm_build.modules import registry
from autoglm_build.runtime.kv_cache import CacheSpec, KVCache

Feed = Dict[str, np.ndarray]
BACKENDS = ("auto", "tensorrt", "onnxruntime")
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(bool)": "bool"}
PHASES = ("prefill", "decode")


class DeviceCall(NamedTuple):
    """A module bound to inputs on the GPU (:meth:`TensorRTBackend.device_call`)."""

    call: Callable[[], None]  # one enqueue on the stream; returns at once
    sync: Callable[[], None]  # waits for the stream
    outputs: Dict[str, Any]  # output name -> the Polygraphy DeviceArray the engine writes


class Backend:
    """One loaded graph/engine per module.

    Attributes:
        name: ``onnxruntime`` or ``tensorrt``.
        precision: ``fp32``, ``fp16`` or ``int8``.
        max_batch: the largest batch every module accepts (TensorRT: the engines' profiles).
        context: the decoder's largest total length (TensorRT: the decode profile's bound).
    """

    name = ""

    def __init__(self, precision: str) -> None:
        self.precision = precision
        self.max_batch: Optional[int] = None
        self.context: Optional[int] = None
        self.vision_patches: Optional[int] = None  # TensorRT: the vision profile's patch bound
        self.prefill_chunk: Optional[int] = None  # TensorRT: the prefill profile's longest call
        self.files: Dict[str, str] = {}

    def run(self, module: str, feed: Feed, phase: str = "prefill") -> Dict[str, np.ndarray]:
        raise NotImplementedError

    def input_dtype(self, module: str, name: str) -> np.dtype:
        """The numpy dtype the module's graph/engine declares for input ``name``."""
        raise NotImplementedError

    def kv_cache(self, spec: CacheSpec, slots: int, context: int) -> KVCache:
        """The decoder's KV cache for ``slots`` rows of up to ``context`` tokens, in the dtype the decoder
        declares for ``past_*`` (host arrays; a device backend returns its own :class:`KVCache`)."""
        return KVCache(self, spec, slots, context, self.input_dtype("decoder", "past_key.0"))

    def close(self) -> None:
        """Release device resources (TensorRT contexts)."""

    def describe(self) -> Dict[str, Any]:
        return {"backend": self.name, "precision": self.precision, "files": dict(self.files),
                "max_batch": self.max_batch, "context": self.context}


def _checked(workdir: Path, manifest: Manifest, art: Artifact) -> Path:
    """``art``'s file, checked by the opened build (inside the workdir, the recorded bytes)."""
    from autoglm_build.workdir import Build

    return Build(workdir, manifest).check(art)


def graph_artifact(manifest: Manifest, module: str, precision: str) -> Optional[Artifact]:
    """The module's ONNX for a precision: the calibrated graph, or for fp32 the optimized/exported one."""
    if precision == "fp32":
        from autoglm_build.stages.calibrate import fp32_artifacts

        arts = fp32_artifacts(manifest, module, "onnx")
    else:
        arts = manifest.artifacts_of(f"calibrate-{precision}", module, f"onnx-{precision}")
    return arts[0] if arts else None


def engine_artifact(manifest: Manifest, module: str, precision: str) -> Optional[Artifact]:
    arts = manifest.artifacts_of(f"engine-{precision}", module, "engine")
    return arts[0] if arts else None


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime sessions on the build's graphs (CUDA provider where installed, else CPU)."""

    name = "onnxruntime"

    def __init__(self, workdir: Path, manifest: Manifest, modules: Sequence[str], precision: str = "fp32",
                 providers: Optional[List[str]] = None, threads: int = 0) -> None:
        import onnxruntime as ort

        from autoglm_build.onnx_io import ort_options

        super().__init__(precision)
        opts = ort_options(threads)  # exact INT8 products on CPUs without VNNI too
        # Idle intra-op threads would spin after each call, taking the cores from the Python work between
        # calls (sampling, the HTTP side): on 2 cores a decode step took 2.2-2.9 ms without spinning and
        # 4.6-4.9 ms with it, and the numpy work after it 3x longer.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        self.providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.sessions: Dict[str, Any] = {}
        self.outputs: Dict[str, List[str]] = {}
        self.dtypes: Dict[str, Dict[str, np.dtype]] = {}
        for module in modules:
            art = graph_artifact(manifest, module, precision)
            if art is None:
                raise UserError(f"{module}: no {precision} graph in {workdir}",
                                hint="run `autoglm-build run` (fp32/int8/fp16 graphs) first")
            path = _checked(workdir, manifest, art)
            self.files[module] = art.path
            session = ort.InferenceSession(str(path), opts, providers=self.providers)
            self.sessions[module] = session
            self.outputs[module] = [o.name for o in session.get_outputs()]
            self.dtypes[module] = {i.name: np.dtype(_ORT_TYPES[i.type]) for i in session.get_inputs()
                                   if i.type in _ORT_TYPES}

    def input_dtype(self, module: str, name: str) -> np.dtype:
        return self.dtypes[module][name]

    def run(self, module: str, feed: Feed, phase: str = "prefill") -> Dict[str, np.ndarray]:
        """The module's outputs; float inputs are cast to the float type the graph declares (an FP16
        graph's KV cache takes FP16, embeddings come as FP32)."""
        names, dtypes = self.outputs[module], self.dtypes[module]
        feed = {n: v.astype(dtypes[n], copy=False) if v.dtype.kind == "f" and n in dtypes and dtypes[n].kind == "f"
                else v for n, v in feed.items()}
        return dict(zip(names, self.sessions[module].run(names, feed)))

    def kv_cache(self, spec: CacheSpec, slots: int, context: int) -> KVCache:
        from autoglm_build.runtime.kv_cache import OrtKVCache

        return OrtKVCache(self, spec, slots, context, self.input_dtype("decoder", "past_key.0"))


class TensorRTBackend(Backend):
    """TensorRT engines through Polygraphy's ``TrtRunner`` (one activated context per profile).

    Engines are checked before deserializing: sidecar TensorRT version and compute capability equal
    to the running ones, bytes hashing to the manifest's sha256.
    """

    name = "tensorrt"

    def __init__(self, workdir: Path, manifest: Manifest, modules: Sequence[str], precision: str = "fp16") -> None:
        super().__init__(precision)
        self.runners: Dict[str, Dict[str, Any]] = {}
        self.dtypes: Dict[str, Dict[str, Any]] = {}
        self._device_buffers: Dict[str, List[Any]] = {}  # runner name -> the buffers bound to its context
        try:
            for module in modules:
                art = engine_artifact(manifest, module, precision)
                if art is None:
                    raise UserError(f"{module}: no {precision} engine in {workdir}",
                                    hint=f"run `autoglm-build engine --precision {precision}` on the GPU machine")
                self.files[module] = art.path
                self._load(_checked(workdir, manifest, art), art.sha256, module)
        except BaseException:
            self.close()
            raise

    def _load(self, path: Path, sha256: str, module: str) -> None:
        from polygraphy.backend.trt import TrtRunner

        from autoglm_build.engine.sidecar import check_loadable, deserialize

        trt = trt_env.load()
        sidecar = check_loadable(path, sha256, trt.__version__, trt_env.gpu()["compute_capability"])
        engine = deserialize(trt, path)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.dtypes[module] = {n: trt_env.numpy_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
        first_dims = min(shapes[0][2][0] for shapes in [list(p.values()) for p in sidecar.profiles])
        if registry.get(module).batch_axis == "batch":
            self.max_batch = first_dims if self.max_batch is None else min(self.max_batch, first_dims)
        else:  # the vision tower's axis 0 is its packed patches
            self.vision_patches = first_dims
        runners = {}
        for k, profile_name in enumerate(sidecar.profile_names):
            runner = TrtRunner(engine, optimization_profile=k, name=f"{module}-{profile_name}")
            runner.activate()
            runners[profile_name] = runner
        self.runners[module] = runners
        if module == "decoder" and "attention_mask" in sidecar.profiles[-1]:
            self.context = sidecar.profiles[-1]["attention_mask"][2][1]
            self.prefill_chunk = sidecar.profiles[0]["inputs_embeds"][2][1]

    def input_dtype(self, module: str, name: str) -> np.dtype:
        return np.dtype(self.dtypes[module][name])

    def runner(self, module: str, phase: str = "prefill") -> Any:
        """The module's activated TrtRunner for ``phase`` (its only one for single-profile engines)."""
        runners = self.runners[module]
        return runners.get(phase) or next(iter(runners.values()))

    def _cast(self, module: str, feed: Feed) -> Dict[str, np.ndarray]:
        dtypes = self.dtypes[module]
        return {n: np.ascontiguousarray(v.astype(dtypes.get(n, v.dtype), copy=False)) for n, v in feed.items()}

    def run(self, module: str, feed: Feed, phase: str = "prefill") -> Dict[str, np.ndarray]:
        out = self.runner(module, phase).infer(self._cast(module, feed))
        # Polygraphy reuses its host buffers on the next call: copy.
        return {n: np.array(v, dtype=np.float32 if v.dtype == np.float16 else None, copy=True) for n, v in out.items()}

    def device_call(self, module: str, feed: Feed, phase: str = "prefill") -> DeviceCall:
        """What a benchmark times: the engine alone. The inputs are copied to the GPU
        once, beforehand (the torch side's are on the GPU too); input shapes and every tensor's
        address are set once and the output buffers allocated once, so ``call`` is one
        ``execute_async_v3`` on the runner's stream, without the per-call input checks, output
        allocator callbacks and stream synchronization of Polygraphy's ``infer``. ``sync`` waits;
        ``outputs`` hold the results on the GPU.

        The binding lives in the phase's execution context: binding it again frees the earlier call's
        buffers, so only the latest call of a module and phase may run.

        Raises:
            UserError: the feed's shapes lie outside the engine's profile for ``phase``.
        """
        from polygraphy import cuda

        trt = trt_env.load()
        runner = self.runner(module, phase)
        context, engine, stream = runner.context, runner.engine, runner.stream
        stream.synchronize()  # an earlier binding's work may still read its buffers
        for buffer in self._device_buffers.pop(runner.name, []):
            buffer.free()
        buffers = self._device_buffers[runner.name] = []

        def bind(name: str, shape: Tuple[int, ...], dtype: Any) -> Any:
            # An empty tensor (the prefill's zero-length cache) still gets a buffer: a real address.
            array = cuda.DeviceArray(shape=shape if int(np.prod(shape)) else (1,), dtype=dtype)
            buffers.append(array)
            if not context.set_tensor_address(name, array.ptr):
                raise UserError(f"{self.files[module]}: TensorRT refused the address of tensor '{name}'")
            return array

        for name, host in self._cast(module, feed).items():
            if not context.set_input_shape(name, host.shape):
                raise UserError(f"{self.files[module]}: input '{name}' shape {host.shape} is outside the "
                                f"engine's {phase} profile")
            array = bind(name, host.shape, host.dtype)
            if host.size:
                array.copy_from(host, stream=stream)
        outputs = {}
        for name in (engine.get_tensor_name(i) for i in range(engine.num_io_tensors)):
            if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                if hasattr(context, "set_output_allocator"):  # Polygraphy's `infer` may have set one
                    context.set_output_allocator(name, None)
                outputs[name] = bind(name, tuple(context.get_tensor_shape(name)), self.dtypes[module][name])

        def call() -> None:
            if not context.execute_async_v3(stream.ptr):
                raise RuntimeError(f"{module}: TensorRT execute_async_v3 failed; its log is above")

        return DeviceCall(call, stream.synchronize, outputs)

    def close(self) -> None:
        for buffers in getattr(self, "_device_buffers", {}).values():
            for buffer in buffers:
                buffer.free()
        self._device_buffers = {}
        for runners in self.runners.values():
            for runner in runners.values():
                if runner.is_active:
                    runner.deactivate()
        self.runners = {}


def open_backend(workdir: Path, modules: Sequence[str], backend: str = "auto",
                 precision: Optional[str] = None, optional: Sequence[str] = ()) -> Backend:
    """The requested backend over a workdir's artifacts.

    ``auto`` picks TensorRT when it is installed and the manifest has engines for every required
    module, else ONNX Runtime. Precision defaults to ``fp16`` on TensorRT and ``fp32`` on ONNX
    Runtime. Modules in ``optional`` are loaded when the build has them for that backend and
    precision, and left out otherwise (``Backend.files`` says which were loaded).

    Raises:
        UserError: unknown backend, missing graphs/engines, or files changed since the build.
        EnvironmentMissing: ``tensorrt`` requested where TensorRT is not installed.
    """
    if backend not in BACKENDS:
        raise UserError(f"--backend: '{backend}' is not one of {', '.join(BACKENDS)}")
    workdir = Path(workdir)
    manifest = Manifest.load(workdir)
    if not manifest.artifacts:
        raise UserError(f"{workdir}: no build here (manifest.json missing or empty)",
                        hint="run `autoglm-build run` first")
    required = [m for m in modules if m not in optional]
    if backend == "auto":
        engine_precision = precision or "fp16"
        has_engines = all(engine_artifact(manifest, m, engine_precision) for m in required)
        backend = "tensorrt" if has_engines and trt_env.available() else "onnxruntime"
    if backend == "tensorrt":
        trt_env.load()
        precision = precision or "fp16"
        present = [m for m in modules if m in required or engine_artifact(manifest, m, precision)]
        return TensorRTBackend(workdir, manifest, present, precision)
    precision = precision or "fp32"
    present = [m for m in modules if m in required or graph_artifact(manifest, m, precision)]
    return OnnxRuntimeBackend(workdir, manifest, present, precision)
