"""A fake ``tensorrt`` for one API surface (8.5.3, 10.13.0 or 11.1.0), with no GPU.

The surface (``../../surfaces/<version>.json``, read from NVIDIA/TensorRT's binding sources by
``scripts/trt_api_surface.py``) decides what exists: every bound class and enum value of that version
is here, and nothing else — a name a version does not bind raises AttributeError as the real
bindings do (``TacticSource.CUBLAS`` on 11, ``ILayer.precision_is_set`` on 11, ``IProgressMonitor``
on 8.5...). Members with no behaviour below record the call and return None; the builder, config,
network, parser, engine and execution context behave:

- the ONNX parser reads the graph with ``onnx`` (inputs, outputs, one layer per node, types);
  8.5's parser has no LayerNormalization importer (as on the device);
- ``build_serialized_network`` refuses what TensorRT refuses: precision builder flags on a
  strongly typed network, the INT8 flag with neither Q/DQ nor a calibrator, an optimization
  profile missing for a dynamic input; it drives a progress monitor when one is set;
- the engine is JSON naming the ONNX file; an execution context runs that ONNX with ONNX Runtime on
  host memory that the fake CUDA runtime (:mod:`fake_cuda`) hands out as device pointers;
- an engine belongs to the device current when it was deserialized: a context made with another
  device current, and an ``execute_async_v3`` on another device, another device's stream or memory,
  are violations of the fake CUDA runtime (``fake_cuda.FakeCudart.kernel``), where it is installed.

An engine's activation memory (``device_memory_size``, 1 MiB unless ``FAKE_TRT_DEVICE_MEMORY`` says
otherwise) is written by every run: a context given memory of its own (``set_device_memory`` on 10+, the
``device_memory`` property on 8.5) fails a run when that memory is not a live allocation of the
engine's size (freed, too small), and the fake CUDA runtime checks the run's order against other
streams' use of it, as for any buffer it writes.

Environment: ``FAKE_TRT_VERSION`` (e.g. ``11.1.0``), ``FAKE_TRT_LOG`` (JSON lines of recorded calls),
``FAKE_TRT_OUTPUT_BIAS`` (``logits:0.09``: INT8 engines are broken builds, :func:`_broken`),
``FAKE_TRT_DEVICE_MEMORY`` (``decoder.stage0=3145984,decoder.stage1=5243136``: engine name -> its
activation memory in bytes).
"""

# ruff: noqa: F821 (the bound classes, DataType, ITensor..., are made from the surface at import time)
from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

_bool = bool  # the module binds `bool` to DataType.BOOL, as the real package does

__version__ = os.environ.get("FAKE_TRT_VERSION", "10.13.0")
_SURFACES = Path(__file__).resolve().parents[2] / "surfaces"
_surface_file = next((p for p in sorted(_SURFACES.glob("*.json")) if __version__.startswith(p.stem.rsplit(".", 1)[0])),
                     None)
if _surface_file is None:
    raise ImportError(f"fake tensorrt: no surface for {__version__} in {_SURFACES}")
SURFACE = json.loads(_surface_file.read_text())
MAJOR_MINOR = tuple(int(p) for p in __version__.split(".")[:2])


def _cudart() -> Any:
    """The fake CUDA runtime where it is installed (``FAKE_TRT_CUDA``), else None (one device, unchecked)."""
    try:
        import fake_cuda
    except ImportError:
        return None
    return fake_cuda.installed()


def _current_device() -> int:
    cudart = _cudart()
    return cudart.device if cudart is not None else 0


def record(owner: str, member: str, *args: Any) -> None:
    log = os.environ.get("FAKE_TRT_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(json.dumps({"pid": os.getpid(), "call": f"{owner}.{member}",
                                 "args": [_describe(a) for a in args]}) + "\n")


def _describe(value: Any) -> Any:
    if isinstance(value, (int, float, str, _bool)) or value is None:
        return value
    if isinstance(value, EnumMember):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    return type(value).__name__


def _members(name: str) -> Dict[str, str]:
    entry = SURFACE["classes"].get(name)
    if entry is None:
        return {}
    found = dict(entry["members"])
    for base in entry["bases"]:
        found.update({k: v for k, v in _members(base).items() if k not in found})
    return found


# ---- enums ------------------------------------------------------------------------------------


class EnumMember:
    def __init__(self, owner: str, name: str, value: int) -> None:
        self.owner, self.name, self.value = owner, name, value

    def __int__(self) -> int:
        return self.value

    __index__ = __int__

    def __hash__(self) -> int:
        return hash((self.owner, self.value))

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, EnumMember) and (other.owner, other.value) == (self.owner, self.value)

    def __lt__(self, other: Any) -> bool:
        return self.value < int(other)

    def __or__(self, other: Any) -> int:
        return self.value | int(other)

    def __repr__(self) -> str:
        return f"<{self.owner}.{self.name}: {self.value}>"

    def __str__(self) -> str:
        return f"{self.owner}.{self.name}"


class _EnumType(type):
    def __getattr__(cls, name: str) -> Any:
        raise AttributeError(f"type object 'tensorrt.{cls.__name__}' has no attribute '{name}' "
                             f"(fake TensorRT {__version__})")

    def __iter__(cls):
        return iter(cls.__members__.values())


def _make_enum(name: str, entry: dict) -> type:
    short = name.split(".")[-1]
    values = [m for m, kind in entry["members"].items() if kind == "value"]
    members = {m: EnumMember(short, m, i) for i, m in enumerate(values)}
    cls = _EnumType(short, (), {"__members__": members, **members})
    return cls


# ---- classes ----------------------------------------------------------------------------------


class Fake:
    """Base of every bound class: attributes of the surface only; unknown members record and return None."""

    _surface = ""

    def __getattr__(self, name: str) -> Any:
        # only reached when normal lookup failed: a member of the surface with no behaviour here
        members = _members(type(self)._surface_name())
        if name.startswith("_") or name not in members:
            raise AttributeError(f"'tensorrt.{type(self)._surface_name()}' object has no attribute '{name}' "
                                 f"(fake TensorRT {__version__})")
        if members[name] == "method":
            def method(*args: Any, **kwargs: Any) -> Any:
                record(type(self)._surface_name(), name, *args, *kwargs.values())
                return True if name.startswith("set_") else None  # the bindings' setters report success
            return method
        props = self.__dict__.get("_props", {})
        return props[name] if name in props else _default(name)

    def __setattr__(self, name: str, value: Any) -> None:
        cls = type(self)
        generated = cls.__dict__.get("_generated", False)
        if not name.startswith("_") and generated:
            members = _members(cls._surface_name())
            if name not in members or members[name] not in ("property",):
                raise AttributeError(f"'tensorrt.{cls._surface_name()}' object has no attribute '{name}' "
                                     f"(fake TensorRT {__version__})")
            record(cls._surface_name(), f"{name}=", value)
            self.__dict__.setdefault("_props", {})[name] = value
            return
        object.__setattr__(self, name, value)

    @classmethod
    def _surface_name(cls) -> str:
        for klass in cls.__mro__:
            if klass.__dict__.get("_generated"):
                return klass._surface
        return cls._surface


_BEHAVIOUR: Dict[str, type] = {}
# What a property reads before anything set it, where None would not do (TensorRT's defaults).
_DEFAULTS = {"DLA_core": -1, "avg_timing_iterations": 1, "builder_optimization_level": 3, "max_aux_streams": -1,
             "num_DLA_cores": 0, "max_threads": 1, "default_device_type": ("DeviceType", "GPU"),
             "engine_capability": ("EngineCapability", "STANDARD"), "profiling_verbosity": ("ProfilingVerbosity",
                                                                                            "LAYER_NAMES_ONLY"),
             "hardware_compatibility_level": ("HardwareCompatibilityLevel", "NONE"), "quantization_flags": 0,
             "flags": 0}


def _default(name: str) -> Any:
    value = _DEFAULTS.get(name)
    if isinstance(value, tuple):
        enum = globals()[value[0]]
        return enum.__members__.get(value[1], next(iter(enum.__members__.values())))
    return value


def behaviour(name: str):
    def register(cls: type) -> type:
        _BEHAVIOUR[name] = cls
        return cls
    return register


def _make_class(name: str, entry: dict, made: Dict[str, type]) -> type:
    members = _members(name)
    namespace: Dict[str, Any] = {"_surface": name, "_generated": True}
    impl = _BEHAVIOUR.get(name)
    if impl is not None:
        for attr, value in vars(impl).items():
            if attr.startswith("__") and attr not in ("__init__", "__len__", "__getitem__", "__bytes__", "__iter__",
                                                      "__enter__", "__exit__", "__str__", "__repr__"):
                continue
            if attr.startswith("_") or attr in members or attr.startswith("__"):
                namespace[attr] = value
    if "__enter__" in members:  # the bindings' context managers (common_enter/common_exit)
        namespace.setdefault("__enter__", lambda self: self)
        namespace.setdefault("__exit__", lambda self, *exc: None)
    bases = tuple(made[b] for b in entry["bases"] if b in made) or (Fake,)
    if name == "IHostMemory":  # the real one exposes the buffer protocol (file.write, np.frombuffer)
        bases = (bytes,) + bases
    return type(name, bases, namespace)


# ---- behaviour ---------------------------------------------------------------------------------


def _enum(owner: str, name: str) -> EnumMember:
    return getattr(globals()[owner], name)


def _dtype_of(onnx_type: int) -> EnumMember:
    names = {1: "FLOAT", 10: "HALF", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 2: "UINT8", 16: "BF16"}
    name = names.get(onnx_type, "FLOAT")
    if name not in DataType.__members__ and name == "INT64":
        name = "INT32"  # TensorRT 8.5's parser casts INT64 down to INT32
    return _enum("DataType", name)


_NP = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
       "BOOL": np.bool_, "UINT8": np.uint8}


@behaviour("ILogger")
class _ILogger:
    def __init__(self, *args: Any) -> None:
        pass


@behaviour("Logger")
class _Logger:
    def __init__(self, min_severity: Any = None) -> None:
        self._min = min_severity

    def log(self, severity: Any, msg: str) -> None:
        pass


@behaviour("IProgressMonitor")
class _IProgressMonitor:
    def __init__(self) -> None:
        pass


@behaviour("IOutputAllocator")
class _IOutputAllocator:
    def __init__(self) -> None:
        pass


@behaviour("IDebugListener")
class _IDebugListener:
    def __init__(self) -> None:
        pass


@behaviour("IAlgorithmSelector")
class _IAlgorithmSelector:
    def __init__(self) -> None:
        pass


class FakeTensor:
    def __init__(self, name: str, dtype: EnumMember, shape: List[int]) -> None:
        self.name, self.dtype, self.shape = name, dtype, tuple(shape)


@behaviour("ITensor")
class _ITensor:
    def __init__(self, tensor: FakeTensor) -> None:
        self._t = tensor

    @property
    def name(self) -> str:
        return self._t.name

    @property
    def dtype(self) -> EnumMember:
        return self._t.dtype

    @dtype.setter
    def dtype(self, value: EnumMember) -> None:  # the network I/O types a flag-mode build may set (SetTensorDatatypes)
        self._t.dtype = value

    @property
    def shape(self) -> Any:
        return Dims(self._t.shape)

    @property
    def is_network_input(self) -> bool:
        return self._t.name in self._network_inputs

    @property
    def is_network_output(self) -> bool:
        return False

    @property
    def is_shape_tensor(self) -> bool:
        return False

    @property
    def location(self) -> EnumMember:
        return _enum("TensorLocation", "DEVICE")

    @property
    def allowed_formats(self) -> int:
        return 1

    @property
    def dynamic_range(self) -> Any:
        return None


@behaviour("Dims")
class _Dims:
    def __init__(self, shape: Any = ()) -> None:
        self._shape = tuple(int(d) for d in shape)

    def __len__(self) -> int:
        return len(self._shape)

    def __getitem__(self, i: Any) -> Any:
        return self._shape[i]

    def __iter__(self):
        return iter(self._shape)

    def __str__(self) -> str:
        return str(self._shape)

    __repr__ = __str__


def _dims_eq(self: Any, other: Any) -> bool:
    return tuple(self) == tuple(other)


@behaviour("ILayer")
class _ILayer:
    def __init__(self, node: Any, inputs: List[Any], outputs: List[Any]) -> None:
        self._node, self._inputs, self._outputs = node, inputs, outputs
        self._precision = inputs[0].dtype if inputs else _enum("DataType", "FLOAT")

    @property
    def name(self) -> str:
        return self._node.name

    @property
    def type(self) -> EnumMember:
        kinds = {"MatMul": "MATRIX_MULTIPLY", "Gemm": "MATRIX_MULTIPLY", "Conv": "CONVOLUTION", "Softmax": "SOFTMAX",
                 "QuantizeLinear": "QUANTIZE", "DequantizeLinear": "DEQUANTIZE", "Cast": "CAST",
                 "ReduceMean": "REDUCE", "LayerNormalization": "NORMALIZATION", "Constant": "CONSTANT",
                 "Shape": "SHAPE", "Gather": "GATHER", "Concat": "CONCATENATION", "Reshape": "SHUFFLE"}
        members = LayerType.__members__
        return members.get(kinds.get(self._node.op_type, "ELEMENTWISE"), members["ELEMENTWISE"])

    @property
    def num_inputs(self) -> int:
        return len(self._inputs)

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    def get_input(self, i: int) -> Any:
        return self._inputs[i]

    def get_output(self, i: int) -> Any:
        return self._outputs[i]

    @property
    def precision(self) -> EnumMember:
        return self._precision

    @property
    def precision_is_set(self) -> bool:
        return False

    def get_output_type(self, i: int) -> EnumMember:
        return self._outputs[i].dtype

    def output_type_is_set(self, i: int) -> bool:
        return False


@behaviour("INetworkDefinition")
class _INetworkDefinition:
    def __init__(self, flags: int) -> None:
        self._flags, self._inputs, self._outputs, self._layers = flags, [], [], []
        self._onnx: Optional[str] = None
        self._has_qdq = False

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    @property
    def num_inputs(self) -> int:
        return len(self._inputs)

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    def get_layer(self, i: int) -> Any:
        return self._layers[i]

    def get_input(self, i: int) -> Any:
        return self._inputs[i]

    def get_output(self, i: int) -> Any:
        return self._outputs[i]

    def __len__(self) -> int:
        return len(self._layers)

    def __getitem__(self, i: int) -> Any:
        if i >= len(self._layers):
            raise IndexError(i)
        return self._layers[i]

    @property
    def name(self) -> str:
        return Path(self._onnx or "network").stem

    @property
    def flags(self) -> int:
        return self._flags

    def get_flag(self, flag: Any) -> bool:
        return _bool(self._flags & (1 << int(flag)))

    @property
    def has_implicit_batch_dimension(self) -> bool:
        return False

    def _strongly_typed(self) -> bool:
        if MAJOR_MINOR >= (11, 0):
            return True  # TensorRT 11 knows nothing else
        flag = NetworkDefinitionCreationFlag.__members__.get("STRONGLY_TYPED")
        return flag is not None and _bool(self._flags & (1 << int(flag)))


@behaviour("OnnxParser")
class _OnnxParser:
    def __init__(self, network: Any, logger: Any) -> None:
        self._network, self._errors = network, []

    def parse_from_file(self, path: str) -> bool:
        record("OnnxParser", "parse_from_file", path)
        import onnx

        model = onnx.load(path, load_external_data=False)
        inferred = onnx.shape_inference.infer_shapes(model)
        types = {v.name: v.type.tensor_type.elem_type for v in
                 list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
        types.update({t.name: t.data_type for t in model.graph.initializer})
        net = self._network
        net._onnx = str(Path(path).resolve())
        initializers = {t.name for t in model.graph.initializer}
        tensors: Dict[str, Any] = {}

        def tensor(name: str) -> Any:
            if name not in tensors:
                tensors[name] = ITensor(FakeTensor(name, _dtype_of(types.get(name, 1)), []))
                tensors[name]._network_inputs = {t.name for t in net._inputs}
            return tensors[name]

        for value in model.graph.input:
            if value.name in initializers:
                continue
            dims = [d.dim_value if d.dim_value else -1 for d in value.type.tensor_type.shape.dim]
            t = ITensor(FakeTensor(value.name, _dtype_of(value.type.tensor_type.elem_type), dims))
            tensors[value.name] = t
            net._inputs.append(t)
        for t in tensors.values():
            t._network_inputs = {i.name for i in net._inputs}
        for node in model.graph.node:
            if node.op_type == "LayerNormalization" and MAJOR_MINOR < (8, 6):
                self._errors.append(f"{node.name}: No importer registered for op: LayerNormalization. "
                                    "Attempting to import as plugin. ... Plugin not found")
                return False
            net._has_qdq |= node.op_type == "QuantizeLinear"
            net._layers.append(ILayer(node, [tensor(i) for i in node.input if i],
                                      [tensor(o) for o in node.output]))
        for value in model.graph.output:
            dims = [d.dim_value if d.dim_value else -1 for d in value.type.tensor_type.shape.dim]
            net._outputs.append(ITensor(FakeTensor(value.name, _dtype_of(value.type.tensor_type.elem_type), dims)))
        return True

    def parse(self, model: bytes, path: Optional[str] = None) -> bool:
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=".onnx", delete=False) as fh:
            fh.write(model)
        return self.parse_from_file(fh.name)

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, i: int) -> Any:
        return self._errors[i]

    def clear_errors(self) -> None:
        self._errors = []

    def set_flag(self, flag: Any) -> None:
        record("OnnxParser", "set_flag", flag)

    def clear_flag(self, flag: Any) -> None:
        record("OnnxParser", "clear_flag", flag)

    def get_flag(self, flag: Any) -> bool:
        return False

    def supports_operator(self, op: str) -> bool:
        return True


@behaviour("IOptimizationProfile")
class _IOptimizationProfile:
    def __init__(self) -> None:
        self._shapes: Dict[str, tuple] = {}

    def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:
        record("IOptimizationProfile", "set_shape", input, list(min), list(opt), list(max))
        self._shapes[input] = (tuple(min), tuple(opt), tuple(max))

    def get_shape(self, input: str) -> List[Any]:
        return [Dims(s) for s in self._shapes.get(input, ((), (), ()))]

    def set_shape_input(self, input: str, min: Any, opt: Any, max: Any) -> None:
        record("IOptimizationProfile", "set_shape_input", input)

    def get_shape_input(self, input: str) -> Any:
        return None

    def __bool__(self) -> bool:
        return True


@behaviour("ITimingCache")
class _ITimingCache:
    def __init__(self, data: bytes = b"") -> None:
        self._data = bytes(data)

    def serialize(self) -> Any:
        return IHostMemory(b"fake-timing-cache:" + __version__.encode())

    def combine(self, input_cache: Any, ignore_mismatch: bool) -> bool:
        return True


@behaviour("IHostMemory")
class _IHostMemory:
    def __init__(self, data: bytes) -> None:
        self._data = bytes(data)

    def __bytes__(self) -> bytes:
        return self._data

    def __len__(self) -> int:
        return len(self._data)

    @property
    def nbytes(self) -> int:
        return len(self._data)


@behaviour("IBuilderConfig")
class _IBuilderConfig:
    def __init__(self) -> None:
        self._flags: set = set()
        self._profiles: List[Any] = []
        self._cache = None

    def set_flag(self, flag: Any) -> None:
        record("IBuilderConfig", "set_flag", flag)
        self._flags.add(flag.name)

    def clear_flag(self, flag: Any) -> None:
        record("IBuilderConfig", "clear_flag", flag)
        self._flags.discard(flag.name)

    def get_flag(self, flag: Any) -> bool:
        return flag.name in self._flags

    def add_optimization_profile(self, profile: Any) -> int:
        record("IBuilderConfig", "add_optimization_profile")
        self._profiles.append(profile)
        return len(self._profiles) - 1

    @property
    def num_optimization_profiles(self) -> int:
        return len(self._profiles)

    def set_memory_pool_limit(self, pool: Any, pool_size: int) -> None:
        record("IBuilderConfig", "set_memory_pool_limit", pool, pool_size)

    def get_memory_pool_limit(self, pool: Any) -> int:
        return 0

    def set_tactic_sources(self, tactic_sources: int) -> bool:
        record("IBuilderConfig", "set_tactic_sources", tactic_sources)
        return True

    def get_tactic_sources(self) -> int:
        return 0

    def create_timing_cache(self, serialized_timing_cache: bytes) -> Any:
        return ITimingCache(serialized_timing_cache)

    def set_timing_cache(self, cache: Any, ignore_mismatch: bool) -> bool:
        self._cache = cache
        return True

    def get_timing_cache(self) -> Any:
        return self._cache

    def set_preview_feature(self, feature: Any, enable: bool) -> None:
        record("IBuilderConfig", "set_preview_feature", feature, enable)

    def get_preview_feature(self, feature: Any) -> bool:
        return False

    def get_quantization_flag(self, flag: Any) -> bool:
        return False


@behaviour("Builder")
class _Builder:
    def __init__(self, logger: Any) -> None:
        self._logger = logger

    def create_network(self, flags: int = 0) -> Any:
        record("Builder", "create_network", flags)
        return INetworkDefinition(int(flags))

    def create_builder_config(self) -> Any:
        return IBuilderConfig()

    def create_optimization_profile(self) -> Any:
        return IOptimizationProfile()

    def build_serialized_network(self, network: Any, config: Any) -> Any:
        record("Builder", "build_serialized_network", sorted(config._flags))
        error = _refusal(network, config)
        if error:
            record("Builder", "error", error)
            print(f"[fake TensorRT {__version__}] [E] {error}", flush=True)
            return None
        monitor = config.__dict__.get("_props", {}).get("progress_monitor")
        if monitor is not None:
            monitor.phase_start("Building engine", None, 2)
            for step in range(2):
                monitor.step_complete("Building engine", step)
            monitor.phase_finish("Building engine")
        import base64

        import onnx

        model = base64.b64encode(onnx.load(network._onnx).SerializeToString()).decode()  # the graph is the engine
        engine = {"fake_trt": __version__, "onnx": network._onnx, "model": model,
                  "strongly_typed": network._strongly_typed(),
                  "flags": sorted(config._flags),
                  "inputs": [[t.name, t.dtype.name, list(t._t.shape)] for t in network._inputs],
                  "outputs": [[t.name, t.dtype.name, list(t._t.shape)] for t in network._outputs],
                  "profiles": [{n: [list(s) for s in v] for n, v in p._shapes.items()} for p in config._profiles]}
        return IHostMemory(json.dumps(engine).encode())

    @property
    def platform_has_fast_fp16(self) -> bool:
        return True

    @property
    def platform_has_fast_int8(self) -> bool:
        return True


def _refusal(network: Any, config: Any) -> Optional[str]:
    """What TensorRT would reject at build time, as its error log says it."""
    precision_flags = {"FP16", "INT8", "BF16", "FP8", "INT4", "FP4"} & config._flags
    if network._strongly_typed() and precision_flags:
        return (f"IBuilderConfig::setFlag: BuilderFlag {sorted(precision_flags)} is not allowed with a strongly "
                "typed network")
    if "INT8" in config._flags and not network._has_qdq and config.__dict__.get("_props", {}).get(
            "int8_calibrator") is None:
        return "Calibration failure occurred with no scaling factors detected"
    dynamic = [t.name for t in network._inputs if -1 in t._t.shape]
    for k, profile in enumerate(config._profiles or [None]):
        missing = [n for n in dynamic if profile is None or n not in profile._shapes]
        if missing:
            return f"optimization profile {k} is missing values for dynamic inputs {missing}"
    return None


@behaviour("Runtime")
class _Runtime:
    def __init__(self, logger: Any) -> None:
        self._logger = logger

    def deserialize_cuda_engine(self, serialized_engine: Any) -> Any:
        try:
            data = json.loads(bytes(serialized_engine))
        except (ValueError, UnicodeDecodeError):
            return None
        if data.get("fake_trt") != __version__:
            return None
        return ICudaEngine(data)


def _device_memory(engine: str) -> int:
    """Engine ``engine``'s activation memory in bytes: ``FAKE_TRT_DEVICE_MEMORY``'s, else 1 MiB."""
    sizes = dict(item.split("=") for item in os.environ.get("FAKE_TRT_DEVICE_MEMORY", "").split(",") if item)
    return int(sizes.get(engine, 1 << 20))


@behaviour("ICudaEngine")
class _ICudaEngine:
    def __init__(self, data: dict) -> None:
        self._data = data
        self._device = _current_device()  # TensorRT deserializes onto the current device
        self._io = [(n, d, s, "INPUT") for n, d, s in data["inputs"]] + [(n, d, s, "OUTPUT")
                                                                         for n, d, s in data["outputs"]]

    @property
    def num_io_tensors(self) -> int:
        return len(self._io)

    def get_tensor_name(self, index: int) -> str:
        return self._io[index][0]

    def _tensor(self, name: str) -> tuple:
        return next(t for t in self._io if t[0] == name)

    def get_tensor_mode(self, name: str) -> EnumMember:
        return _enum("TensorIOMode", self._tensor(name)[3])

    def get_tensor_dtype(self, name: str) -> EnumMember:
        return _enum("DataType", self._tensor(name)[1])

    def get_tensor_shape(self, name: str) -> Any:
        return Dims(self._tensor(name)[2])

    def get_tensor_location(self, name: str) -> EnumMember:
        return _enum("TensorLocation", "DEVICE")

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> List[Any]:
        return [Dims(s) for s in self._data["profiles"][profile_index][name]]

    def get_tensor_format_desc(self, name: str, profile_index: int = 0) -> str:
        return "Row major linear FP32 format (kLINEAR)"

    def get_tensor_format(self, name: str, profile_index: int = 0) -> EnumMember:
        return _enum("TensorFormat", "LINEAR")

    def get_tensor_vectorized_dim(self, name: str, profile_index: int = 0) -> int:
        return -1

    def get_tensor_components_per_element(self, name: str, profile_index: int = 0) -> int:
        return 1

    def is_shape_inference_io(self, name: str) -> bool:
        return False

    @property
    def num_optimization_profiles(self) -> int:
        return len(self._data["profiles"])

    @property
    def num_layers(self) -> int:
        return 1

    @property
    def name(self) -> str:
        return Path(self._data["onnx"]).stem

    @property
    def device_memory_size(self) -> int:
        return _device_memory(self.name)

    @property
    def device_memory_size_v2(self) -> int:
        return _device_memory(self.name)

    def get_device_memory_size_for_profile(self, profile_index: int) -> int:
        return _device_memory(self.name)

    def get_device_memory_size_for_profile_v2(self, profile_index: int) -> int:
        return _device_memory(self.name)

    @property
    def refittable(self) -> bool:
        return False

    @property
    def has_implicit_batch_dimension(self) -> bool:
        return False

    def create_execution_context(self, strategy: Any = None) -> Any:
        cudart = _cudart()
        if cudart is not None and cudart.device != self._device:
            cudart.violation(f"execution context of engine {self.name} (device {self._device}) created with device "
                             f"{cudart.device} current")
        context = IExecutionContext(self)
        # USER_MANAGED (TensorRT >= 10): the context runs only once it is given device memory
        context._memory = 0 if strategy is not None and getattr(strategy, "name", "") == "USER_MANAGED" else None
        record("ICudaEngine", "create_execution_context", getattr(strategy, "name", None))
        return context

    def create_execution_context_without_device_memory(self) -> Any:
        context = self.create_execution_context()
        context._memory = 0  # runs only once ``device_memory`` is set
        return context

    def serialize(self) -> Any:
        return IHostMemory(json.dumps(self._data).encode())

    def create_engine_inspector(self) -> Any:
        return EngineInspector(self)


@behaviour("EngineInspector")
class _EngineInspector:
    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def get_engine_information(self, format: Any) -> str:
        return json.dumps({"Layers": ["fake"], "Bindings": [t[0] for t in self._engine._io]})

    def get_layer_information(self, layer_index: int, format: Any) -> str:
        return json.dumps({"Name": "fake"})


@behaviour("IExecutionContext")
class _IExecutionContext:
    def __init__(self, engine: Any) -> None:
        self._engine, self._shapes, self._addresses, self._allocators = engine, {}, {}, {}
        self._profile = 0
        self._memory: Optional[int] = None  # 0: made without device memory and none given yet
        self._session = None

    @property
    def engine(self) -> Any:
        return self._engine

    @property
    def active_optimization_profile(self) -> int:
        return self._profile

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        record("IExecutionContext", "set_optimization_profile_async", profile_index)
        self._profile = profile_index
        return True

    def set_input_shape(self, name: str, shape: Any) -> bool:
        lo, _, hi = self._engine._data["profiles"][self._profile][name]
        shape = tuple(int(d) for d in shape)
        if len(shape) != len(lo) or any(not a <= d <= b for a, d, b in zip(lo, shape, hi)):
            return False
        if self._shapes.get(name) != shape:
            self.__dict__["_reshaped"] = True  # TensorRT 8.5: the next enqueue allocates, and cannot be captured
        self._shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> Any:
        if self._engine._tensor(name)[3] == "INPUT":
            return Dims(self._shapes.get(name, self._engine._tensor(name)[2]))
        return Dims(self._run(zeros=True)[name].shape)

    def set_device_memory(self, memory: int, size: int) -> None:
        if int(size) < self._engine.device_memory_size_v2:
            raise ValueError(f"set_device_memory: {size} bytes, the engine needs {self._engine.device_memory_size_v2}")
        record("IExecutionContext", "set_device_memory", int(memory))
        self._memory = int(memory)

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if int(memory) % 256:  # NvInferRuntime.h: "The pointer must have at least 256-byte alignment."
            record("IExecutionContext", "set_tensor_address misaligned", name, int(memory) % 256)
            return False
        self._addresses[name] = int(memory)
        return True

    def get_tensor_address(self, name: str) -> int:
        return self._addresses.get(name, 0)

    def set_output_allocator(self, name: str, output_allocator: Any) -> bool:
        if output_allocator is None:
            self._allocators.pop(name, None)
        else:
            self._allocators[name] = output_allocator
        return True

    def get_output_allocator(self, name: str) -> Any:
        return self._allocators.get(name)

    def infer_shapes(self) -> List[str]:
        return []

    @property
    def all_binding_shapes_specified(self) -> bool:
        return True

    @property
    def all_shape_inputs_specified(self) -> bool:
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        record("IExecutionContext", "execute_async_v3")
        cudart = _cudart()
        if cudart is not None and int(stream_handle or 0) in cudart.capturing:
            return self._capture(cudart, int(stream_handle or 0))
        self.__dict__["_reshaped"] = False
        return self._execute(stream_handle)

    def _capture(self, cudart: Any, stream: int) -> bool:
        """Into the stream's CUDA graph: this run with the shapes and addresses the context has now (a launch
        replays them, whatever the context is bound to by then, as a real graph's kernels keep their arguments).
        TensorRT 8.5's rule: the first enqueue after an input shape changed cannot be captured (it allocates);
        nor can one that calls back into an output allocator."""
        if self.__dict__.get("_reshaped", True):
            cudart.violation(f"engine {self._engine.name}: captured the first enqueue after a shape change")
            return False
        if any(a is not None for a in self._allocators.values()):
            cudart.violation(f"engine {self._engine.name}: captured with an output allocator")
            return False
        shapes, addresses = dict(self._shapes), dict(self._addresses)

        def run(on: int) -> bool:
            saved = self._shapes, self._addresses
            self._shapes, self._addresses = dict(shapes), dict(addresses)
            try:
                return self._execute(on)
            finally:
                self._shapes, self._addresses = saved

        return cudart.capture(stream, run)

    def _execute(self, stream_handle: int) -> bool:
        given = self.__dict__.get("_props", {}).get("device_memory")  # the `device_memory =` property (8.5)
        if getattr(self, "_memory", None) == 0 and not given:  # made without device memory, none given: fails
            record("IExecutionContext", "execute_async_v3 without device memory")
            return False
        scratch = int(given or getattr(self, "_memory", None) or 0)  # 0: TensorRT's own memory (unchecked)
        cudart = _cudart()
        if scratch and cudart is not None and not self._scratch_live(cudart, scratch):
            return False
        outputs, written = {}, {}
        for name, value in self._run(zeros=False).items():
            value = np.ascontiguousarray(value.astype(_NP[self._engine._tensor(name)[1]]))
            allocator = self._allocators.get(name)
            if allocator is not None:
                address = allocator.reallocate_output_async(name, 0, max(value.nbytes, 1), 256, stream_handle) \
                    if hasattr(allocator, "reallocate_output_async") else \
                    allocator.reallocate_output(name, 0, max(value.nbytes, 1), 256)
                allocator.notify_shape(name, Dims(value.shape))
            else:
                address = self._addresses[name]
            outputs[name], written[name] = value, int(address)
        if cudart is not None:
            reads = [self._addresses[n] for n, _, _, mode in self._engine._io
                     if mode == "INPUT" and int(np.prod(self._shapes[n]))]
            writes = [a for n, a in written.items() if outputs[n].nbytes] + ([scratch] if scratch else [])
            if not cudart.kernel(self._engine.name, self._engine._device, int(stream_handle or 0), reads, writes):
                return False
        for name, value in outputs.items():
            ctypes.memmove(written[name], value.ctypes.data, value.nbytes)
        return True

    def _scratch_live(self, cudart: Any, scratch: int) -> bool:
        """Whether the memory this context was given is a live allocation with room for the engine's
        activations (a violation of the fake CUDA runtime otherwise: a use after free, or too small)."""
        need = self._engine.device_memory_size
        alloc = cudart.find(scratch)
        if alloc is not None and scratch + need <= alloc.address + alloc.size:
            return True
        cudart.violation(f"engine {self._engine.name} runs on activation memory {scratch:#x} that is not a live "
                         f"allocation of its {need} bytes")
        return False

    def _run(self, zeros: bool) -> Dict[str, np.ndarray]:
        import onnxruntime as ort

        if self._session is None:
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            opts.add_session_config_entry("session.x64quantprecision", "1")  # INT8 as TensorRT: exact products
            import base64

            model = base64.b64decode(self._engine._data["model"])
            self._session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
            self._int8 = b"QuantizeLinear" in model
        feed = {}
        for name, dtype, _, mode in self._engine._io:
            if mode != "INPUT":
                continue
            shape = self._shapes[name]
            array = np.zeros(shape, dtype=_NP[dtype])
            if not zeros and array.size:
                buffer = (ctypes.c_byte * array.nbytes).from_address(self._addresses[name])
                array = np.frombuffer(buffer, dtype=_NP[dtype]).reshape(shape).copy()
            feed[name] = array
        # the engine's I/O types are TensorRT's (8.5 has INT32 where the graph says INT64): the graph
        # run underneath gets its own types back, as TensorRT's parser casts inside the engine
        graph_types = {i.name: i.type for i in self._session.get_inputs()}
        for name, array in feed.items():
            if graph_types.get(name) == "tensor(int64)" and array.dtype != np.int64:
                feed[name] = array.astype(np.int64)
        names = [o.name for o in self._session.get_outputs()]
        outputs = dict(zip(names, self._session.run(names, feed)))
        return _broken(outputs) if self._int8 else outputs


def _broken(outputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """``FAKE_TRT_OUTPUT_BIAS=name:fraction`` makes every engine built from a Q/DQ graph a broken
    build: a fixed random bias of up to ``fraction`` of max|output| added along that output's last
    axis (issue 16: a +-9 % logit bias on the INT8 decoder)."""
    spec = os.environ.get("FAKE_TRT_OUTPUT_BIAS")
    if not spec:
        return outputs
    name, fraction = spec.split(":")
    if name not in outputs:
        return outputs
    value = outputs[name]
    bias = np.random.default_rng(0).uniform(-1.0, 1.0, value.shape[-1]) * float(fraction) * np.abs(value).max()
    return {**outputs, name: (value + bias).astype(value.dtype)}


# ---- the module ---------------------------------------------------------------------------------


def _build_module() -> None:
    made: Dict[str, type] = {}
    entries = SURFACE["classes"]
    pending = [n for n in entries if "." not in n]
    while pending:  # bases before the classes that derive from them
        progress = False
        for name in list(pending):
            entry = entries[name]
            if entry["kind"] == "enum":
                made[name] = _make_enum(name, entry)
            elif all(b in made or b not in entries for b in entry["bases"]):
                made[name] = _make_class(name, entry, made)
            else:
                continue
            pending.remove(name)
            progress = True
        if not progress:
            for name in pending:
                made[name] = _make_class(name, entries[name], made)
            break
    for name, entry in entries.items():  # nested enums: ILogger.Severity, with exported values
        if "." in name:
            owner, short = name.split(".")
            enum = _make_enum(name, entry)
            for target in [n for n, e in entries.items() if n == owner or owner in e["bases"]]:
                if target in made:
                    type.__setattr__(made[target], short, enum)
                    for value, member in enum.__members__.items():
                        type.__setattr__(made[target], value, member)
    if "Dims" in made:
        made["Dims"].__eq__ = _dims_eq
        made["Dims"].__hash__ = None
    globals().update(made)


_build_module()
_MODULE_NAMES = set(SURFACE["module"])


def init_libnvinfer_plugins(logger: Any, namespace: str) -> bool:
    return True


def get_plugin_registry() -> Any:
    return None


def nptype(trt_type: Any) -> Any:
    return _NP[trt_type.name]


def volume(iterable: Any) -> int:
    return int(np.prod(list(iterable))) if len(list(iterable)) else 1


for _name in ("init_libnvinfer_plugins", "get_plugin_registry", "nptype", "volume"):
    if _name not in _MODULE_NAMES:
        del globals()[_name]
# the package's DataType aliases (trt.float32 is DataType.FLOAT ...), where this version has them
_ALIASES = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int8": "INT8", "int32": "INT32",
            "int64": "INT64", "bool": "BOOL", "uint8": "UINT8", "fp8": "FP8", "int4": "INT4", "fp4": "FP4",
            "e8m0": "E8M0"}
for _name, _member in _ALIASES.items():
    if _name in _MODULE_NAMES and _member in DataType.__members__:
        globals()[_name] = DataType.__members__[_member]


def __getattr__(name: str) -> Any:
    raise AttributeError(f"module 'tensorrt' has no attribute '{name}' (fake TensorRT {__version__})")
