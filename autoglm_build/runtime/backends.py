"""Run a build's modules: ONNX Runtime on its graphs, or TensorRT on its engines.

``serve`` and ``bench`` use the same objects: a :class:`Backend` loads one graph or engine per
module from the workdir's manifest (refusing files whose sha256 no longer matches it) and runs it
on numpy feeds. The decoder runs in two phases, ``prefill`` and ``decode``, which on TensorRT are
the engine's two optimization profiles (:mod:`autoglm_build.engine.profiles`), each with its own
execution context. A staged module (``decoder.stages`` or ``vision.stages`` > 1) loads one graph/engine per
stage and ``run("decoder", ...)`` chains them (:mod:`autoglm_build.parts`), on either backend alike.

Imports on the GPU harness's Python 3.9 without torch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from autoglm_build.engine import tensorrt as trt_env
from autoglm_build.errors import UserError
from autoglm_build.manifest import Artifact, Manifest
from autoglm_build.modules import registry
from autoglm_build.onnx_io import gather_table
from autoglm_build.parts import HIDDEN, HIDDEN_IN, chain, module_parts, part_feed
from autoglm_build.runtime.kv_cache import CacheSpec, KVCache

Feed = Dict[str, np.ndarray]
BACKENDS = ("auto", "tensorrt", "onnxruntime")
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(bool)": "bool"}
PHASES = ("prefill", "decode")
log = logging.getLogger("autoglm_build.serve")


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
        self.prefill_batch: Optional[int] = None  # TensorRT: the prefill profile's most rows
        self.files: Dict[str, str] = {}  # module, or each stage of a staged module -> its file
        self.parts: Dict[str, List[str]] = {}  # module -> what was loaded for it (its stages, or itself)
        self.inputs: Dict[str, List[str]] = {}  # loaded graph/engine -> its input names

    def run(self, module: str, feed: Feed, phase: str = "prefill") -> Dict[str, np.ndarray]:
        """The module's outputs on ``feed``; a staged module's stages run in turn, each on its own inputs."""
        units = self.parts.get(module, [module])
        if len(units) == 1:
            return self.run_part(units[0], feed, phase)
        return chain([(self.inputs[u], lambda f, u=u: self.run_part(u, f, phase)) for u in units])(feed)

    def run_part(self, part: str, feed: Feed, phase: str = "prefill") -> Dict[str, np.ndarray]:
        """One loaded graph/engine (a module, or one stage of a staged module) on ``feed``."""
        raise NotImplementedError

    def part_of(self, module: str, name: str) -> str:
        """The loaded graph/engine of ``module`` that takes input ``name`` (a stage, for a staged module)."""
        units = self.parts.get(module, [module])
        return next((u for u in units if name in self.inputs.get(u, ())), units[0])

    def input_dtype(self, module: str, name: str) -> np.dtype:
        """The numpy dtype the module's graph/engine declares for input ``name``."""
        raise NotImplementedError

    def kv_cache(self, spec: CacheSpec, slots: int, context: int) -> KVCache:
        """The decoder's KV cache for ``slots`` rows of up to ``context`` tokens, in the dtype the decoder
        declares for ``past_*`` (host arrays; a device backend returns its own :class:`KVCache`)."""
        return KVCache(self, spec, slots, context, self.input_dtype("decoder", "past_key.0"))

    def lookup(self, module: str) -> Optional[Tuple[np.ndarray, np.dtype]]:
        """A module the host can run itself as a table lookup.

        Returns:
            ``(table, dtype)``, where ``table[ids].astype(dtype)`` equals the module's output for ``ids``; None here:
            every call runs the graph/engine.
        """
        return None

    def encode(self, module: str, feed: Feed, output: str) -> Any:
        """An encoder's ``output`` for the decoder's inputs: a host array here; the TensorRT backend leaves
        it on the GPU (:class:`~autoglm_build.runtime.device.DeviceEmbeds`)."""
        return self.run(module, feed)[output]

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
                 providers: Optional[List[str]] = None, threads: int = 0,
                 cores: Optional[Sequence[int]] = None) -> None:
        import onnxruntime as ort

        from autoglm_build.onnx_io import ort_options

        super().__init__(precision)
        opts = ort_options(threads, shared=True)  # exact INT8 products on CPUs without VNNI too; one arena
        # Idle intra-op threads would spin after each call, taking the cores from the Python work between
        # calls (sampling, the HTTP side): on 2 cores a decode step took 2.2-2.9 ms without spinning and
        # 4.6-4.9 ms with it, and the numpy work after it 3x longer.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        self.providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.affinities = intra_op_affinities(cores, threads) if "CUDAExecutionProvider" not in self.providers else ""
        if self.affinities:  # the pool's threads start with the sessions: placed now, or wherever the OS puts them
            opts.add_session_config_entry("session.intra_op_thread_affinities", self.affinities)
        self.workdir = Path(workdir)
        self.sessions: Dict[str, Any] = {}
        self.lookups: Dict[str, Optional[Tuple[np.ndarray, np.dtype]]] = {}  # lookup()'s answers
        self.outputs: Dict[str, List[str]] = {}
        self.dtypes: Dict[str, Dict[str, np.dtype]] = {}
        for module in modules:
            self.parts[module] = module_parts(manifest.config, module)
            for part in self.parts[module]:
                art = graph_artifact(manifest, part, precision)
                if art is None:
                    raise UserError(f"{part}: no {precision} graph in {workdir}",
                                    hint="run `autoglm-build run` (fp32/int8/fp16 graphs) first")
                path = _checked(workdir, manifest, art)
                self.files[part] = art.path
                session = ort.InferenceSession(str(path), opts, providers=self.providers)
                self.sessions[part] = session
                self.outputs[part] = [o.name for o in session.get_outputs()]
                self.inputs[part] = [i.name for i in session.get_inputs()]
                self.dtypes[part] = {i.name: np.dtype(_ORT_TYPES[i.type]) for i in session.get_inputs()
                                     if i.type in _ORT_TYPES}

    def input_dtype(self, module: str, name: str) -> np.dtype:
        return self.dtypes[self.part_of(module, name)][name]

    def run_part(self, part: str, feed: Feed, phase: str = "prefill") -> Dict[str, np.ndarray]:
        """The graph's outputs; float inputs are cast to the float type the graph declares (an FP16
        graph's KV cache takes FP16, embeddings come as FP32)."""
        names, dtypes = self.outputs[part], self.dtypes[part]
        feed = {n: v.astype(dtypes[n], copy=False) if v.dtype.kind == "f" and n in dtypes and dtypes[n].kind == "f"
                else v for n, v in feed.items()}
        return dict(zip(names, self.sessions[part].run(names, feed)))

    def lookup(self, module: str) -> Optional[Tuple[np.ndarray, np.dtype]]:
        """``(table, dtype)`` where ``module``'s graph is a table lookup (:func:`~autoglm_build.onnx_io.gather_table`:
        its output for ``ids`` is ``table[ids].astype(dtype)``), else None. Read once per module."""
        if module not in self.lookups:
            units = self.parts.get(module, [module])
            found = gather_table(self.workdir / self.files[units[0]]) if len(units) == 1 and units[0] in self.files \
                else None
            self.lookups[module] = (found[0], found[2]) if found and found[1] in self.inputs[units[0]] else None
        return self.lookups[module]

    def kv_cache(self, spec: CacheSpec, slots: int, context: int) -> KVCache:
        from autoglm_build.runtime.kv_cache import OrtKVCache

        return OrtKVCache(self, spec, slots, context, self.input_dtype("decoder", "past_key.0"))


class ScratchPool:
    """One activation-scratch buffer on one GPU and the execution contexts pointed at it.

    TensorRT gives every execution context its own activation memory unless the context is made without
    it; the backend makes its multi-profile engines' contexts without and points them here instead
    (:meth:`TensorRTBackend._contexts_sharing_scratch` says which contexts share a pool and why that is
    safe). The buffer grows to the largest engine added: a bigger one is allocated, every context
    already added is pointed at it, then the old one is freed, which is only safe while nothing runs
    (the backend adds engines while it loads them).
    """

    def __init__(self, gpu: Optional[int], user_managed: bool) -> None:
        self.gpu = gpu  # None: the current GPU (no placement)
        self.user_managed = user_managed  # TensorRT >= 10's set_device_memory, else 8.5's device_memory
        self.buffer: Any = None  # a polygraphy.cuda.DeviceArray of ``nbytes``
        self.nbytes = 0
        self.parts: List[str] = []  # the engines sharing it, in load order
        self._contexts: Dict[str, List[Tuple[Any, int]]] = {}  # part -> its contexts, each with its engine's need

    def fit(self, size: int) -> None:
        """Room for an engine needing ``size`` bytes: a bigger buffer on the pool's GPU if needed, every
        context already added re-pointed at it, then the old buffer freed (once, even if a re-point fails)."""
        if self.buffer is not None and size <= self.nbytes:
            return
        from polygraphy import cuda

        from autoglm_build.runtime.device import select

        select(self.gpu)
        old, self.buffer = self.buffer, cuda.DeviceArray(shape=(max(size, 1),), dtype=np.uint8)
        self.nbytes = size
        try:
            for contexts in self._contexts.values():
                for context, need in contexts:
                    self._point(context, need)
        finally:
            if old is not None:
                old.free()

    def add(self, part: str, context: Any, need: int) -> None:
        """Point ``context`` (made without device memory, of an engine needing ``need`` bytes, no more than
        :meth:`fit` made room for) at the buffer, and keep it for later re-points."""
        self._point(context, need)
        if part not in self.parts:
            self.parts.append(part)
        self._contexts.setdefault(part, []).append((context, need))

    def _point(self, context: Any, need: int) -> None:
        if self.user_managed:
            context.set_device_memory(self.buffer.ptr, need)
        else:
            context.device_memory = self.buffer.ptr

    def release(self, part: str) -> None:
        """Drop the pool's references to ``part``'s contexts (the backend releases the contexts themselves)."""
        self._contexts.pop(part, None)

    def free(self) -> None:
        """Free the buffer, with the pool's GPU current; call after every context using it is released
        (any left from a load that failed midway go first)."""
        from autoglm_build.runtime.device import select

        select(self.gpu)
        self._contexts.clear()
        if self.buffer is not None:
            self.buffer.free()
            self.buffer = None

    def describe(self) -> Dict[str, Any]:
        return {"gpu": self.gpu, "bytes": self.nbytes, "parts": list(self.parts)}


class TensorRTBackend(Backend):
    """TensorRT engines through Polygraphy's ``TrtRunner`` (one activated context per profile).

    Engines are checked before deserializing: sidecar TensorRT version and compute capability equal
    to the running ones, bytes hashing to the manifest's sha256.

    ``devices`` places the engines on GPUs (pipeline parallel, ``serve --devices 0,1``): stage ``i`` of
    the decoder's ``N`` on ``devices[i * len(devices) // N]``, every other module (vision, audio, embed)
    on ``devices[0]``. Each engine is deserialized and its contexts and stream created with its GPU
    current, and every call it runs makes that GPU current first; the device KV cache keeps each stage's
    layers on its GPU (:mod:`~autoglm_build.runtime.device_cache`). ``None`` (the default): no GPU is
    ever selected, the engines run on the current one, as before placement existed.

    Activation scratch: the decoder's parts on one GPU share one buffer, so do a staged encoder's stages,
    every other multi-profile engine has its own (:meth:`_contexts_sharing_scratch`;
    ``describe()["scratch_pools"]`` lists them).

    Raises:
        UserError: a bad placement (more GPUs than decoder stages, a GPU that does not exist), exit 2.
    """

    name = "tensorrt"

    def __init__(self, workdir: Path, manifest: Manifest, modules: Sequence[str], precision: str = "fp16",
                 devices: Optional[Sequence[int]] = None, origin: str = "--devices") -> None:
        super().__init__(precision)
        self.devices = list(devices) if devices is not None else None
        self.config = manifest.config  # the build's config (JSON data)
        self.placement: Dict[str, Optional[int]] = {}  # loaded engine -> its GPU (None: the current one)
        self.peer_access: Dict[str, bool] = {}  # "0->1": whether GPU 0 reaches GPU 1's memory directly
        self._devices: Dict[Optional[int], Any] = {}  # GPU -> its Device (stream), made on first use
        self._runner_device: Dict[str, Optional[int]] = {}  # runner name -> its engine's GPU
        self.runners: Dict[str, Dict[str, Any]] = {}
        self.dtypes: Dict[str, Dict[str, Any]] = {}
        self.shapes: Dict[str, Dict[str, Tuple[int, ...]]] = {}  # engine -> tensor -> its shape (-1: dynamic)
        self._device_buffers: Dict[str, List[Any]] = {}  # runner name -> the buffers bound to its context
        self._bound: Dict[str, Any] = {}  # runner name -> the key of the binding its context holds (bind)
        self.generations: Dict[str, int] = {}  # runner name -> how often bind (re)set its context
        self._pools: Dict[Tuple[str, Optional[int]], ScratchPool] = {}  # (decoder or engine, GPU) -> its scratch
        self.scratch_bytes: Dict[str, int] = {}  # multi-profile engine -> the scratch it needs
        self._caches: List[Any] = []
        try:
            if self.devices is not None:
                from autoglm_build.runtime.device import check_devices, check_placement

                layer_stages = ((manifest.config or {}).get("decoder") or {}).get("stages", 1)
                check_placement(self.devices, layer_stages, origin)
                check_devices(self.devices, origin)
            for module in modules:
                self.parts[module] = module_parts(manifest.config, module)
                for part, index in zip(self.parts[module], self._place(module, self.parts[module])):
                    art = engine_artifact(manifest, part, precision)
                    if art is None:
                        raise UserError(f"{part}: no {precision} engine in {workdir}",
                                        hint=f"run `autoglm-build engine --precision {precision}` on the GPU machine")
                    self.files[part] = art.path
                    self.placement[part] = index
                    self._load(_checked(workdir, manifest, art), art.sha256, part)
            self._connect()
        except BaseException:
            self.close()
            raise

    def _place(self, module: str, parts: List[str]) -> List[Optional[int]]:
        """The GPU of each of ``module``'s loaded parts (module docstring)."""
        if self.devices is None:
            return [None] * len(parts)
        if module != "decoder":
            return [self.devices[0]] * len(parts)
        from autoglm_build.runtime.device import stage_devices

        head = bool(((self.config or {}).get("decoder") or {}).get("head_stage")) and len(parts) > 1
        return stage_devices(self.devices, len(parts) - head, head)

    @property
    def rebinds(self) -> int:
        """Contexts (re)bound by :meth:`bind`, all runners together: once per shape bucket, not per step."""
        return sum(self.generations.values())

    def _connect(self) -> None:
        """Peer access between GPUs whose stages hand activations to each other (both ways), where the
        hardware allows it (else the peer copies go through the host)."""
        from autoglm_build.runtime.device import enable_peer_access

        chain = [self.placement[u] for u in self.parts.get("decoder", [])]
        for a, b in zip(chain, chain[1:]):
            if a is not None and b is not None and a != b:
                for x, y in ((a, b), (b, a)):
                    self.peer_access[f"{x}->{y}"] = enable_peer_access(x, y)

    def _select(self, part: str) -> None:
        """Make ``part``'s GPU current for this thread (nothing without a placement)."""
        from autoglm_build.runtime.device import select

        select(self.placement.get(part))

    def _load(self, path: Path, sha256: str, module: str) -> None:
        from polygraphy.backend.trt import TrtRunner

        from autoglm_build.engine.sidecar import check_loadable, deserialize

        trt = trt_env.load()
        index = self.placement.get(module)
        self._select(module)  # the runtime, the engine, its contexts and their streams: on the part's GPU
        sidecar = check_loadable(path, sha256, trt.__version__, self.compute_capability_of(module))
        engine = deserialize(trt, path)
        self._record_io(trt, engine, module)
        self.inputs[module] = list(sidecar.profiles[0])
        # the batch bound: the last profile's (a decoder's decode profile; its prefill profile may take fewer rows)
        first_dims = next(iter(sidecar.profiles[-1].values()))[2][0]
        spec = registry.get(module)  # ``module``: a module, or one stage of a staged module
        if spec.batch_axis == "batch":
            self.max_batch = first_dims if self.max_batch is None else min(self.max_batch, first_dims)
        else:  # the vision tower's axis 0 is its packed patches (a staged tower: the bound all its stages take)
            self.vision_patches = first_dims if self.vision_patches is None else min(self.vision_patches, first_dims)
        runners = {}
        contexts = self._contexts_sharing_scratch(trt, engine, module, len(sidecar.profile_names))
        for k, profile_name in enumerate(sidecar.profile_names):
            source = contexts[k] if contexts else engine
            runner = TrtRunner(source, optimization_profile=k, name=f"{module}-{profile_name}")
            runner.activate()
            runners[profile_name] = runner
            self._runner_device[runner.name] = index
        self.runners[module] = runners
        if spec.module == "decoder" and "attention_mask" in sidecar.profiles[-1]:
            # a staged decoder: the bounds every stage's engine accepts
            context = sidecar.profiles[-1]["attention_mask"][2][1]
            chunk = sidecar.profiles[0][self.inputs[module][0]][2][1]  # inputs_embeds or hidden_states
            self.context = context if self.context is None else min(self.context, context)
            self.prefill_chunk = chunk if self.prefill_chunk is None else min(self.prefill_chunk, chunk)
            rows = sidecar.profiles[0][self.inputs[module][0]][2][0]
            self.prefill_batch = rows if self.prefill_batch is None else min(self.prefill_batch, rows)

    def _record_io(self, trt: Any, engine: Any, name: str) -> List[str]:
        """The engine's I/O tensors' dtypes and shapes (-1: dynamic) under ``name``; returns their names."""
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.dtypes[name] = {n: trt_env.numpy_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
        self.shapes[name] = {n: tuple(int(d) for d in engine.get_tensor_shape(n)) for n in names}
        return names

    def placement_of(self, part: str) -> Optional[int]:
        """The GPU ``part`` runs on (a module: its first part's; None: the current one)."""
        return self.placement.get(self.parts.get(part, [part])[0])

    def compute_capability_of(self, part: str) -> str:
        """The compute capability of the GPU ``part`` runs on (a decoder module: its first part's)."""
        from autoglm_build.runtime.device import compute_capability

        index = self.placement_of(part)
        return trt_env.gpu()["compute_capability"] if index is None else compute_capability(index)

    def load_engine(self, name: str, path: Path, like: str) -> None:
        """An engine the server built itself (not the build's: no manifest entry, no sidecar; the select engine,
        :mod:`~autoglm_build.runtime.device_select`), loaded on the GPU of ``like``'s last part, one context of its
        own memory, its runner's phase ``name``; closed with the backend. Loaded once: a second call (another
        scheduler's cache on this backend) finds it."""
        from polygraphy.backend.trt import TrtRunner

        from autoglm_build.engine.sidecar import deserialize

        if name in self.runners:  # loaded for an earlier cache of this backend: one runner, bound per cache's key
            return
        trt = trt_env.load()
        self.placement[name] = self.placement.get(self.parts.get(like, [like])[-1])
        self.files[name] = str(path)
        self._select(name)
        engine = deserialize(trt, path)
        names = self._record_io(trt, engine, name)
        self.inputs[name] = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        runner = TrtRunner(engine, name=name)
        runner.activate()
        self.runners[name] = {name: runner}
        self._runner_device[runner.name] = self.placement[name]

    def _contexts_sharing_scratch(self, trt: Any, engine: Any, module: str, profiles: int) -> List[Any]:
        """One execution context per profile, made without activation memory and pointed at a shared
        scratch buffer, for an engine with several profiles (the decoder's prefill and decode) or that is
        one stage of a staged module (a vision stage's one profile). Empty for any other one-profile
        engine (TensorRT allocates that context's own).

        By default TensorRT gives each context its own memory, the size of the engine's largest profile's,
        so a staged decoder would hold one buffer per stage (8 layer stages at an estimated 4.8 GB each at
        the 9B's 25,480-token context, the 2-layer slice's need: more than an 80 GB GPU leaves beside the
        weights). Instead all of
        the decoder's parts placed on one GPU share one buffer (a :class:`ScratchPool` that grows to the
        largest part's need as they load), so do a staged encoder's stages (the 9B's six vision stages at
        one screenshot: one buffer instead of six), and every other module's engine shares one among its
        own contexts. Safe because what shares a buffer never runs at once: the decoder's stages and
        phases run one after another from one thread, the scheduler's, on the serving path on the GPU's
        one stream (:mod:`~autoglm_build.runtime.device_cache`); an encoder's stages run one after another
        on one stream in :meth:`encode` (the server calls it under its media lock, one image at a time);
        Polygraphy's ``infer`` synchronizes after each part and ``device_call``/``device_chain`` wait for
        each stage before the next. The encoders may run from another thread than the decoder, so they
        never share with it. A context's scratch holds nothing between its runs, which is also what lets
        the pool re-point contexts when it grows.

        TensorRT >= 10: contexts with user-managed memory and ``set_device_memory``; 8.5:
        ``create_execution_context_without_device_memory`` and ``device_memory``.
        """
        if profiles < 2 and registry.get(module).module == module:
            return []
        size = int(getattr(engine, "device_memory_size_v2", None) or engine.device_memory_size)
        pool = self._pool(trt, module)
        pool.fit(size)  # before this engine's contexts: a bigger buffer re-points the earlier parts' alone
        self.scratch_bytes[module] = size
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)  # TensorRT >= 10
        contexts = []
        for _ in range(profiles):
            if pool.user_managed:
                context = engine.create_execution_context(strategy.USER_MANAGED)
            else:
                context = engine.create_execution_context_without_device_memory()
            if context is None:
                raise UserError(f"{self.files[module]}: TensorRT could not create an execution context")
            pool.add(module, context, size)
            contexts.append(context)
        return contexts

    def _pool(self, trt: Any, part: str) -> ScratchPool:
        """The scratch pool of ``part``: the one its module's parts share on its GPU (a staged module's
        stages; an unstaged module is its own only part)."""
        index = self.placement.get(part)
        key = (registry.get(part).module, index)
        if key not in self._pools:
            user_managed = (getattr(trt, "ExecutionContextAllocationStrategy", None) is not None
                            and hasattr(trt.IExecutionContext, "set_device_memory"))
            self._pools[key] = ScratchPool(index, user_managed)
        return self._pools[key]

    def input_dtype(self, module: str, name: str) -> np.dtype:
        part = self.part_of(module, name)
        return np.dtype(self.dtypes[part][name])

    def runner(self, module: str, phase: str = "prefill") -> Any:
        """The module's activated TrtRunner for ``phase`` (its only one for single-profile engines)."""
        runners = self.runners[module]
        return runners.get(phase) or next(iter(runners.values()))

    def _cast(self, module: str, feed: Feed) -> Dict[str, np.ndarray]:
        dtypes = self.dtypes[module]
        return {n: np.ascontiguousarray(v.astype(dtypes.get(n, v.dtype), copy=False)) for n, v in feed.items()}

    def run_part(self, part: str, feed: Feed, phase: str = "prefill") -> Dict[str, np.ndarray]:
        """Polygraphy's ``infer`` on the part's GPU: host arrays in and out, so a staged decoder's activations
        cross between GPUs through the host (the host KV cache's path)."""
        runner = self.runner(part, phase)
        self._bound.pop(runner.name, None)  # infer sets its own shapes, addresses and output allocators
        self._select(part)  # infer allocates its buffers on first use: on the part's GPU
        out = runner.infer(self._cast(part, feed))
        # Polygraphy reuses its host buffers on the next call: copy.
        return {n: np.array(v, dtype=np.float32 if v.dtype == np.float16 else None, copy=True) for n, v in out.items()}

    def device_call(self, module: str, feed: Feed, phase: str = "prefill", keep: bool = False) -> DeviceCall:
        """:meth:`device_call_part` for a module; a staged module's stages are bound each to its own
        inputs (the later stages' ``hidden_states`` from one host run of the chain first) and ``call``
        runs them in turn, waiting for each stage's stream before the next one starts (and for the
        previous call's last stage before the first: the stages on one GPU share one activation scratch,
        and a warmup loop calls again without a sync). What it does not time is moving
        ``hidden_states`` between stages (one device copy per stage on one GPU).
        ``keep``: see :meth:`device_call_part`."""
        units = self.parts.get(module, [module])
        if len(units) == 1:
            return self.device_call_part(units[0], feed, phase, keep)
        carried, feeds = dict(feed), []
        for unit in units:  # before binding: a host run rebinds the phase's context
            feeds.append(part_feed(self.inputs[unit], carried))
            carried.update(self.run_part(unit, feeds[-1], phase))
        calls = [self.device_call_part(unit, own, phase, keep) for unit, own in zip(units, feeds)]

        def call() -> None:
            calls[-1].sync()  # the previous call's last stage: the first one's scratch may be the same
            for bound in calls[:-1]:
                bound.call()
                bound.sync()
            calls[-1].call()

        outputs = {n: v for bound in calls for n, v in bound.outputs.items() if n != HIDDEN}
        return DeviceCall(call, calls[-1].sync, outputs)

    def device_chain(self, module: str, feeds: Sequence[Feed], phase: str = "prefill") -> DeviceCall:
        """The module on each of ``feeds`` in turn, as one call: a prompt longer than the prefill
        profile, run as its chunks (each chunk's own past length). Every feed is bound once, on its
        own buffers (``keep``); ``call`` sets each one's shapes and addresses on the phase's context
        again before its run and waits for each run before the next, as the server's chunks do."""
        calls = [self.device_call(module, feed, phase, keep=True) for feed in feeds]

        def call() -> None:
            for bound in calls[:-1]:
                bound.call()
                bound.sync()
            calls[-1].call()

        return DeviceCall(call, calls[-1].sync, calls[-1].outputs)

    def device_call_part(self, module: str, feed: Feed, phase: str = "prefill", keep: bool = False) -> DeviceCall:
        """What a benchmark times: the engine alone. The inputs are copied to the GPU
        once, beforehand (the torch side's are on the GPU too); input shapes and every tensor's
        address are set once and the output buffers allocated once, so ``call`` is one
        ``execute_async_v3`` on the runner's stream, without the per-call input checks, output
        allocator callbacks and stream synchronization of Polygraphy's ``infer``. ``sync`` waits;
        ``outputs`` hold the results on the GPU.

        The binding lives in the phase's execution context: binding it again frees the earlier call's
        buffers, so only the latest call of a module and phase may run. With ``keep``, the buffers stay
        until :meth:`close` and ``call`` sets its shapes and addresses again before each run, so several
        bound calls of one context can take turns (:meth:`device_chain`).

        Raises:
            UserError: the feed's shapes lie outside the engine's profile for ``phase``.
        """
        from polygraphy import cuda

        trt = trt_env.load()
        runner = self.runner(module, phase)
        self._bound.pop(runner.name, None)
        context, engine, stream = runner.context, runner.engine, runner.stream
        self._select(module)  # the buffers below on the engine's GPU
        stream.synchronize()  # an earlier binding's work may still read its buffers
        for buffer in self._device_buffers.pop(runner.name, []):
            buffer.free()
        buffers = self._device_buffers.setdefault(f"{runner.name}:kept" if keep else runner.name, [])
        shapes: Dict[str, Tuple[int, ...]] = {}
        addresses: Dict[str, int] = {}

        def bind(name: str, shape: Tuple[int, ...], dtype: Any) -> Any:
            # An empty tensor (the prefill's zero-length cache) still gets a buffer: a real address.
            array = cuda.DeviceArray(shape=shape if int(np.prod(shape)) else (1,), dtype=dtype)
            buffers.append(array)
            addresses[name] = array.ptr
            if not context.set_tensor_address(name, array.ptr):
                raise UserError(f"{self.files[module]}: TensorRT refused the address of tensor '{name}'")
            return array

        for name, host in self._cast(module, feed).items():
            shapes[name] = host.shape
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
            if keep:  # another kept binding of this context may have run since
                for name, shape in shapes.items():
                    context.set_input_shape(name, shape)
                for name, ptr in addresses.items():
                    if name in outputs and hasattr(context, "set_output_allocator"):
                        context.set_output_allocator(name, None)  # a host `infer` may have set one
                    context.set_tensor_address(name, ptr)
            self._select(module)
            if not context.execute_async_v3(stream.ptr):
                raise RuntimeError(f"{module}: TensorRT execute_async_v3 failed; its log is above")

        return DeviceCall(call, stream.synchronize, outputs)

    # ---- the serving side: one stream per GPU, contexts bound once per shape bucket -----------------

    @property
    def device(self) -> Any:
        """The first GPU's :class:`~autoglm_build.runtime.device.Device` (one CUDA stream): the encoders, the
        embed engine and the decoder's first stage run on it (all of the decoder without a placement)."""
        return self._device_at(self.devices[0] if self.devices else None)

    def device_for(self, part: str) -> Any:
        """The :class:`~autoglm_build.runtime.device.Device` of the GPU ``part`` is placed on: one per GPU,
        shared by every part there."""
        return self._device_at(self.placement.get(part))

    def _device_at(self, index: Optional[int]) -> Any:
        if index not in self._devices:
            from autoglm_build.runtime.device import Device

            self._devices[index] = Device(index)
        return self._devices[index]

    def bind(self, part: str, phase: str, key: Any,
             make: Callable[[], Tuple[Dict[str, Tuple[int, ...]], Dict[str, int]]]) -> Any:
        """The phase's runner of ``part`` with its context bound: ``make()`` gives the input shapes and
        every tensor's device address, set only when ``key`` differs from the binding the context holds
        (so a decode step at an unchanged ``(batch, capacity)`` sets nothing). Output allocators are
        cleared: outputs go to the bound addresses.

        Raises:
            UserError: a shape outside the engine's profile for ``phase``, or an address refused.
        """
        runner = self.runner(part, phase)
        if self._bound.get(runner.name) == key:
            return runner
        self._bound.pop(runner.name, None)
        # a CUDA graph captured over this context is stale from here on (TensorRT may reallocate on a new shape)
        self.generations[runner.name] = self.generations.get(runner.name, 0) + 1
        shapes, addresses = make()
        context = runner.context
        for name, shape in shapes.items():
            if not context.set_input_shape(name, shape):
                raise UserError(f"{self.files[part]}: input '{name}' shape {tuple(shape)} is outside the engine's "
                                f"{phase} profile")
        for name, ptr in addresses.items():
            if name not in shapes and hasattr(context, "set_output_allocator"):
                context.set_output_allocator(name, None)
            if not context.set_tensor_address(name, ptr):
                raise UserError(f"{self.files[part]}: TensorRT refused the address of tensor '{name}'")
        self._bound[runner.name] = key
        return runner

    def execute(self, runner: Any, stream: int) -> None:
        """One ``execute_async_v3`` of a bound runner's context on ``stream`` (a stream of the runner's GPU,
        which is made current first; returns at once)."""
        from autoglm_build.runtime.device import select

        select(self._runner_device.get(runner.name))
        if not runner.context.execute_async_v3(stream):
            raise RuntimeError(f"{runner.name}: TensorRT execute_async_v3 failed; its log is above")

    def kv_cache(self, spec: CacheSpec, slots: int, context: int) -> KVCache:
        """The KV cache on the GPU (:class:`~autoglm_build.runtime.device_cache.DeviceKVCache`), or on the
        host, with a warning, where the engines' dtypes do not let one engine's output be the next one's
        input."""
        from autoglm_build.runtime.device_cache import DeviceKVCache, device_cache_problem

        problem = device_cache_problem(self)
        if problem is not None:
            log.warning("TensorRT: the KV cache stays on the host (%s)", problem)
            return super().kv_cache(spec, slots, context)
        cache = DeviceKVCache(self, spec, slots, context, self.input_dtype("decoder", "past_key.0"))
        self._caches.append(cache)
        return cache

    def encode(self, module: str, feed: Feed, output: str) -> Any:
        """The encoder's ``output`` left on the GPU, in a buffer of its own (freed with the returned
        :class:`~autoglm_build.runtime.device.DeviceEmbeds`), for the KV cache to splice into the decoder's
        ``inputs_embeds`` device to device. Runs on the serving stream, after what is queued there, and
        waits for it once, at the end.

        A staged module (``vision.stages``) runs its stages in turn on that stream, each stage's
        ``hidden_states`` bound as the next one's input where it stays, on the GPU (every stage of an
        encoder is placed on ``devices[0]``); only where the two stages disagree on its dtype does it go
        through the host. The stages share one activation scratch (:meth:`_contexts_sharing_scratch`),
        which is safe because they run one after another on one stream."""
        from autoglm_build.runtime.device import DeviceEmbeds

        units = self.parts.get(module, [module])
        part = units[-1]
        if output not in self.dtypes[part] or output in self.inputs[part]:
            raise UserError(f"{self.files[part]}: the engine has no output '{output}'; its outputs: "
                            f"{', '.join(n for n in self.dtypes[part] if n not in self.inputs[part])}")
        device = self.device_for(part)
        on_gpu: Dict[str, Tuple[int, Tuple[int, ...], np.dtype]] = {}  # an earlier stage's output: where, shape, dtype
        temporary: List[int] = []
        try:
            for unit in units:
                self._enqueue_stage(unit, feed, on_gpu, temporary, device)
            ptr, shape, dtype = on_gpu[output]
            temporary.remove(ptr)
            result = DeviceEmbeds(device, ptr, shape, dtype)
            device.sync()
        except BaseException:
            try:  # the stages already queued may still read the buffers about to be freed
                device.sync()
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
            raise
        finally:
            for ptr in temporary:
                device.free(ptr)
        return result

    def _enqueue_stage(self, unit: str, feed: Feed, on_gpu: Dict[str, Tuple[int, Tuple[int, ...], np.dtype]],
                       temporary: List[int], device: Any) -> None:
        """One part of an encoder queued on ``device``'s stream (:meth:`encode`): its inputs from ``on_gpu``
        (an earlier stage's outputs, ``hidden_states`` as ``hidden_states_in``) or uploaded from ``feed``, its
        outputs in new buffers, added to ``on_gpu``; every buffer it allocates goes into ``temporary``."""
        runner = self.runner(unit)
        self._bound.pop(runner.name, None)
        context, dtypes = runner.context, self.dtypes[unit]

        def bind(name: str, ptr: int, shape: Tuple[int, ...], is_input: bool) -> None:
            if is_input and not context.set_input_shape(name, shape):
                raise UserError(f"{self.files[unit]}: input '{name}' shape {shape} is outside its profile")
            if not context.set_tensor_address(name, ptr):
                raise UserError(f"{self.files[unit]}: TensorRT refused the address of tensor '{name}'")

        def allocate(nbytes: int) -> int:
            ptr = device.malloc(nbytes)
            temporary.append(ptr)
            return ptr

        for name in self.inputs[unit]:
            source, want = HIDDEN if name == HIDDEN_IN else name, np.dtype(dtypes[name])
            if source in on_gpu and on_gpu[source][2] == want:
                ptr, shape, _ = on_gpu[source]
                bind(name, ptr, shape, True)
                continue
            if source in on_gpu:  # the stages disagree on its dtype: through the host, cast
                ptr, shape, dtype = on_gpu[source]
                host = np.empty(shape, dtype)
                device.download(host, ptr)
                device.sync()
            elif source in feed:
                host = feed[source]
            else:
                raise UserError(f"{self.files[unit]}: no '{source}' in the encoder's feed (it has: {', '.join(feed)})")
            host = np.ascontiguousarray(np.asarray(host).astype(want, copy=False))
            ptr = allocate(host.nbytes)
            device.upload(ptr, host)
            bind(name, ptr, host.shape, True)
        for name in [n for n in dtypes if n not in self.inputs[unit]]:
            if hasattr(context, "set_output_allocator"):
                context.set_output_allocator(name, None)
            shape, dtype = tuple(int(d) for d in context.get_tensor_shape(name)), np.dtype(dtypes[name])
            ptr = allocate(int(np.prod(shape)) * dtype.itemsize)
            bind(name, ptr, shape, False)
            on_gpu[name] = (ptr, shape, dtype)
        self.execute(runner, device.stream.ptr)

    def close(self) -> None:
        from autoglm_build.runtime.device import select

        for cache in getattr(self, "_caches", []):
            cache.close()
        self._caches = []
        for device in getattr(self, "_devices", {}).values():
            device.close()
        self._devices = {}
        buffers = getattr(self, "_device_buffers", {})
        pools = getattr(self, "_pools", {})
        for module in list(self.runners):  # each engine's buffers, contexts and engine with its GPU current
            runners = self.runners.pop(module)
            for runner in runners.values():
                select(self._runner_device.get(runner.name))  # its context and stream are that GPU's
                for key in (runner.name, f"{runner.name}:kept"):
                    for buffer in buffers.pop(key, []):
                        buffer.free()
                if runner.is_active:
                    runner.deactivate()
            runner = None
            for pool in pools.values():
                pool.release(module)
            runners.clear()  # the last references to the engine (and its runtime) go here, on its GPU
        for pool in pools.values():  # once, after every context that used it (and a load that failed midway)
            pool.free()
        for rest in buffers.values():  # a load that failed midway
            for buffer in rest:
                buffer.free()
        self._device_buffers, self._pools = {}, {}
        self.runners = {}

    def describe(self) -> Dict[str, Any]:
        out = super().describe()
        out["shared_scratch_bytes"] = dict(self.scratch_bytes)
        out["scratch_pools"] = [pool.describe() for pool in self._pools.values()]
        if self.devices is not None:
            out.update(devices=list(self.devices), placement=dict(self.placement), peer_access=dict(self.peer_access))
        return out


def intra_op_affinities(cores: Optional[Sequence[int]], threads: int) -> str:
    """ONNX Runtime's ``session.intra_op_thread_affinities`` for ``threads`` intra-op threads on ``cores`` (the OS's
    CPU numbers): one core for each of its ``threads - 1`` pool threads, the cores after the first in turn, so
    the first is left free of them (the calling thread, the pool's first, is the caller's to place: the server's
    scheduler thread may run on any of ``cores``); '' where there is no pool (fewer than 2 threads, or 0: ONNX
    Runtime's own choice and placement) or no cores. ONNX Runtime numbers processors from 1."""
    cores = sorted(set(cores or ()))
    if threads < 2 or not cores:
        return ""
    return ";".join(str(cores[(k + 1) % len(cores)] + 1) for k in range(threads - 1))


def open_backend(workdir: Path, modules: Sequence[str], backend: str = "auto",
                 precision: Optional[str] = None, optional: Sequence[str] = (),
                 devices: Optional[Sequence[int]] = None, origin: str = "--devices", threads: int = 0,
                 cores: Optional[Sequence[int]] = None) -> Backend:
    """The requested backend over a workdir's artifacts.

    ``auto`` picks TensorRT when it is installed and the manifest has engines for every required
    module, else ONNX Runtime. Precision defaults to ``fp16`` on TensorRT and ``fp32`` on ONNX
    Runtime. Modules in ``optional`` are loaded when the build has them for that backend and
    precision, and left out otherwise (``Backend.files`` says which were loaded). ``devices``
    places the TensorRT engines on GPUs (:class:`TensorRTBackend`); ``origin`` names where the
    list came from in errors (``--devices``, ``serve.devices``). ``threads``: ONNX Runtime's intra-op threads (0: its
    own choice, every core, where ``cores`` is not read); ``cores``: where its pool's threads run on the CPU
    (:func:`intra_op_affinities`; the server's scheduler cores), else where the OS puts them.

    Raises:
        UserError: unknown backend, missing graphs/engines, files changed since the build, or
            ``devices`` with the ONNX Runtime backend or a placement the build cannot take.
        EnvironmentMissing: ``tensorrt`` requested where TensorRT is not installed.
    """
    if backend not in BACKENDS:
        raise UserError(f"--backend: '{backend}' is not one of {', '.join(BACKENDS)}")
    requested, workdir = backend, Path(workdir)
    manifest = Manifest.load(workdir)
    if not manifest.artifacts:
        raise UserError(f"{workdir}: no build here (manifest.json missing or empty)",
                        hint="run `autoglm-build run` first")
    required = [m for m in modules if m not in optional]

    def built(module: str, find: Callable[[Manifest, str, str], Optional[Artifact]], prec: str) -> bool:
        return all(find(manifest, part, prec) for part in module_parts(manifest.config, module))

    if backend == "auto":
        has_engines = all(built(m, engine_artifact, precision or "fp16") for m in required)
        backend = "tensorrt" if has_engines and trt_env.available() else "onnxruntime"
    if backend == "tensorrt":
        trt_env.load()
        precision = precision or "fp16"
        present = [m for m in modules if m in required or built(m, engine_artifact, precision)]
        return TensorRTBackend(workdir, manifest, present, precision, devices, origin)
    if devices is not None:
        why = "TensorRT is not installed here" if not trt_env.available() else "the build has no engines for it"
        raise UserError(f"{origin} {','.join(str(d) for d in devices)}: places TensorRT engines on GPUs; this runs "
                        f"the onnxruntime backend ({why if requested == 'auto' else '--backend onnxruntime'})",
                        hint="serve with --backend tensorrt on a machine with TensorRT, or drop the placement")
    precision = precision or "fp32"
    present = [m for m in modules if m in required or built(m, graph_artifact, precision)]
    return OnnxRuntimeBackend(workdir, manifest, present, precision, threads=threads, cores=cores)
