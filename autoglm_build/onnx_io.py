"""Saving ONNX models the way every consumer (ONNX Runtime, Polygraphy, TensorRT) loads them, and
moving finished files into place atomically."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from autoglm_build.paths import IntegrityError, is_inside

logger = logging.getLogger(__name__)


def tensor_bytes(tensor: Any) -> int:
    from onnx import helper

    n = 1
    for d in tensor.dims:
        n *= d
    return n * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def save_model(model: Any, out: Path, large_bytes: int) -> List[Path]:
    """Save ``model`` to ``out``; weights beyond ``large_bytes`` go to one ``<name>.data`` file beside it.

    Returns the files written (the graph first). Protobuf cannot serialize 2 GB; one data file (not
    one per tensor) is what TensorRT's parser and ONNX Runtime read directly.
    """
    import onnx

    if sum(tensor_bytes(t) for t in model.graph.initializer) > large_bytes:
        from onnx.external_data_helper import load_external_data_for_model

        data = out.with_name(out.name + ".data")
        onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        # onnx moved the weights out of the in-memory model; read them back so the caller's model
        # stays whole (it may be saved again, elsewhere).
        load_external_data_for_model(model, str(out.parent))
        return [out, data]
    onnx.save_model(model, str(out))
    return [out]


def save_exported(raw: Path, out: Path, large_bytes: int, edit: Callable[[Any], None]) -> List[Path]:
    """:func:`save_model` for a graph an exporter left at ``raw``, without its weights in memory.

    The graph is read without its external weights and changed by ``edit`` (metadata). Where the
    weights go to ``<name>.data``, each initializer that ``save_model`` would move out (its
    ``size_threshold`` of 1024) is copied there from the exporter's file in chunks, in
    ``save_model``'s order and at the offsets it would give; the rest are read into the graph. The
    files are those that loading the whole model and calling :func:`save_model` writes, byte for
    byte; memory holds the graph and one chunk.

    Returns:
        The files written (the graph first).
    """
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    model = onnx.load(str(raw), load_external_data=False)
    edit(model)
    base = str(raw.parent)
    # constants in nodes stay inline, as save_model keeps them
    for tensor in _tensors(model.graph, initializers=False):
        if uses_external_data(tensor):
            load_external_data_for_tensor(tensor, base)
    if sum(tensor_bytes(t) for t in model.graph.initializer) <= large_bytes:
        for tensor in _tensors(model.graph, attributes=False):
            if uses_external_data(tensor):
                load_external_data_for_tensor(tensor, base)
        onnx.save_model(model, str(out))
        return [out]
    data = out.with_name(out.name + ".data")
    with open(data, "wb") as fh:
        for tensor in _tensors(model.graph, attributes=False):
            external = uses_external_data(tensor)
            size = tensor_bytes(tensor) if external else len(tensor.raw_data)
            if not (external or tensor.HasField("raw_data")) or sys.getsizeof(b"") + size < 1024:
                if external:  # small: save_model keeps it in the graph
                    load_external_data_for_tensor(tensor, base)
                continue
            offset = fh.tell()
            if external:
                _copy_external(tensor, raw.parent, fh)
            else:
                fh.write(tensor.raw_data)
                tensor.ClearField("raw_data")
            _point_to(tensor, data.name, offset, fh.tell() - offset)
    onnx.save_model(model, str(out))
    return [out, data]


def _copy_external(tensor: Any, base: Path, out: Any, chunk: int = 1 << 26) -> None:
    """Append an external tensor's bytes to ``out``, ``chunk`` bytes at a time."""
    from onnx.external_data_helper import ExternalDataInfo

    info = ExternalDataInfo(tensor)
    left = info.length if info.length is not None else tensor_bytes(tensor)
    with open(base / info.location, "rb") as src:
        src.seek(info.offset or 0)
        while left:
            block = src.read(min(left, chunk))
            if not block:
                raise IntegrityError(f"{base / info.location}: ends before tensor '{tensor.name}' does")
            out.write(block)
            left -= len(block)


def _point_to(tensor: Any, location: str, offset: int, length: int) -> None:
    """``tensor``'s data is ``length`` bytes at ``offset`` of ``location``: the entries (and their
    order) ``onnx.external_data_helper.set_external_data`` writes, for a tensor without raw data."""
    import onnx

    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


# ONNX Runtime's session entry for exact INT8 matrix products on x86 (kOrtSessionOptionsAvx2PrecisionMode).
# ONNX Runtime runs a Q/DQ graph's MatMul/Conv as uint8 x int8 integer kernels; on an x86 CPU without VNNI
# (AVX2 only, e.g. AMD Zen 3) those sum each pair of neighbouring products with PMADDUBSW in saturating
# 16-bit arithmetic (255 x 127 x 2 = 64,770 is clamped to 32,767). Where activations and weights are both
# near full scale the result is wrong: the tiny build's audio projector (uniform weights, so many near
# +-127) read 0.357 max_rel there against 0.024 with exact arithmetic, and passed on VNNI CPUs. With this
# entry ONNX Runtime uses its uint8 x uint8 kernels instead, exact as TensorRT's INT8 (int32 accumulation),
# so an INT8 check's number is the graph's, not the host CPU's. No effect on float graphs or other CPUs.
ORT_EXACT_INT8 = ("session.x64quantprecision", "1")


_SHARED_ARENA: Optional[bool] = None  # whether this process registered the one CPU arena its sessions share


def shared_cpu_arena() -> bool:
    """Register one CPU memory arena for the ONNX Runtime sessions of this process that ask for it
    (``ort_options(shared=True)``; once), and say whether it could (an older ONNX Runtime without
    ``create_and_register_allocator``: each session keeps its own).

    By default each session has its own arena, which keeps the largest activations it ever held and
    never gives them back; a staged module runs as several sessions, so their peaks add up. Seen on
    the 9B lease: `verify -m vision` ran the six FP16 vision stages at a 1080x2400 screenshot (each
    block's 12 x 12,432 x 12,432 attention scores, ~29 GB of activations a stage) and the kernel killed
    it at 176 GB resident. Sharing one arena, the process holds one stage's peak, not six.
    """
    global _SHARED_ARENA
    if _SHARED_ARENA is None:
        import onnxruntime as ort

        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))  # the defaults
            _SHARED_ARENA = True
        except (AttributeError, RuntimeError) as exc:  # noqa: BLE001 - older ONNX Runtime: per-session arenas
            logger.debug("onnxruntime: no shared CPU arena (%s)", exc)
            _SHARED_ARENA = False
    return _SHARED_ARENA


def ort_options(threads: int = 0, shared: bool = False) -> Any:
    """``onnxruntime.SessionOptions`` for every session that checks or runs a build's graphs:
    errors only in the log, and exact INT8 products on any x86 CPU (:data:`ORT_EXACT_INT8`).

    ``shared``: the session allocates from the process's one CPU arena (:func:`shared_cpu_arena`), for
    sessions that live together and run one after another (a backend's modules and stages, verify's and
    calibrate's chains). That arena is never given back while the process lives, so a session used alone
    (an export's or optimize's check, before the next stage's work in the same process) keeps its own,
    freed with it."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry(*ORT_EXACT_INT8)
    if shared and shared_cpu_arena():
        opts.add_session_config_entry("session.use_env_allocators", "1")
    if threads:
        opts.intra_op_num_threads = threads
    return opts


_ORT_FLOATS = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}


def ort_float(type_name: str) -> Optional[np.dtype]:
    """The numpy dtype of an ONNX Runtime float type name (``tensor(float16)``); None for any other type."""
    name = _ORT_FLOATS.get(type_name)
    return np.dtype(name) if name else None


def feed_for(session: Any, feed: Mapping[str, Any]) -> Dict[str, Any]:
    """``feed`` with each float array in the float type the session's graph declares for that input
    (an FP16 graph's KV cache takes FP16; the reference feeds are FP32). Other arrays pass as they are."""
    declared = {i.name: _ORT_FLOATS.get(i.type) for i in session.get_inputs()}
    out = {}
    for name, value in feed.items():
        dtype = declared.get(name)
        value = np.asarray(value)
        out[name] = value.astype(dtype, copy=False) if dtype and value.dtype.kind == "f" else value
    return out


def move_into_place(files: List[Path], final_dir: Path, stem: str, kind: str) -> List[Tuple[Path, str]]:
    """``os.replace`` each file into ``final_dir`` (same file system: atomic per file).

    External data moves before the graph that points at it; a stale ``<stem>.onnx.data`` of an
    older, smaller export is removed. Returns ``(path, kind)`` pairs (data files get ``<kind>-data``).
    """
    final_dir.mkdir(parents=True, exist_ok=True)
    if not is_inside(final_dir.parent, final_dir):
        raise IntegrityError(f"{final_dir}: resolves to {final_dir.resolve()}, outside {final_dir.parent} "
                             "(a symlink leaves the workdir)", hint="replace the symlink by a directory")
    stale = final_dir / f"{stem}.onnx.data"
    if stale.name not in {f.name for f in files} and stale.exists():
        stale.unlink()
    outputs = []
    for f in sorted(files, key=lambda p: p.suffix == ".onnx"):
        target = final_dir / f.name
        f.replace(target)
        outputs.append((target, f"{kind}-data" if f.name.endswith(".onnx.data") else _kind(f, kind)))
    return outputs


def _kind(path: Path, kind: str) -> str:
    return kind if path.suffix == ".onnx" else path.suffix.lstrip(".")


def external_data_locations(path: Path) -> List[str]:
    """The external-data ``location`` of every tensor in the graph at ``path`` (weights not read).

    Raises:
        IntegrityError: the file is not a readable ONNX graph.
    """
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and onnx's own errors share no base class
        raise IntegrityError(f"{path}: not a readable ONNX graph ({exc.__class__.__name__})",
                             hint="rebuild with --force") from None
    locations = []
    for tensor in _tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in tensor.external_data}
            if entries.get("location", "") not in locations:
                locations.append(entries.get("location", ""))
    return locations


def _tensors(graph: Any, initializers: bool = True, attributes: bool = True) -> Iterator[Any]:
    """Tensors of ``graph`` and of its subgraphs (If/Loop bodies): its initializers (in
    ``onnx.save_model``'s order) if ``initializers``, tensors in node attributes if ``attributes``."""
    if initializers:
        yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attributes:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g, initializers, attributes)
            for sub in attr.graphs:
                yield from _tensors(sub, initializers, attributes)


def gather_table(path: Path) -> Optional[Tuple[np.ndarray, str, np.dtype]]:
    """The table of a graph that is a table lookup and nothing else: one ``Gather`` of an initializer on axis 0 by
    the graph's one input, then at most a ``Cast`` to its one output, every type a float one. Its output for ``ids``
    is exactly ``table[ids].astype(dtype)``, which numpy computes in microseconds where a session call costs ~60 us
    of overhead (the decode step's ``embed``).

    Args:
        path: the graph (its external data file, if any, beside it).

    Returns:
        ``(table, input name, output dtype)``: the table is the initializer itself, mapped read-only from its
        external data file (no copy in memory beside the page cache) or read from the graph. None for any other
        graph, an external file shorter than the table, or where the ``onnx`` package is missing.
    """
    try:
        import onnx
        from onnx import helper, numpy_helper
        from onnx.external_data_helper import ExternalDataInfo
    except ImportError:
        return None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not ours to judge here: the session that loads the graph says what is wrong
        return None
    graph = model.graph
    ops = [n.op_type for n in graph.node]
    if ops not in (["Gather"], ["Gather", "Cast"]) or len(graph.input) != 1 or len(graph.output) != 1:
        return None
    gather = graph.node[0]
    weights = {t.name: t for t in graph.initializer}
    if gather.input[0] not in weights or gather.input[1] != graph.input[0].name or \
            any(a.name == "axis" and a.i != 0 for a in gather.attribute):
        return None
    if ops == ["Gather", "Cast"] and list(graph.node[1].input) != [gather.output[0]]:
        return None
    if graph.node[-1].output[0] != graph.output[0].name:
        return None
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
    tensor = weights[gather.input[0]]
    if tensor.data_type not in floats or graph.output[0].type.tensor_type.elem_type not in floats:
        return None  # bfloat16 and the rest: numpy has no exact type for them
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    out = np.dtype(helper.tensor_dtype_to_np_dtype(graph.output[0].type.tensor_type.elem_type))
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        info = ExternalDataInfo(tensor)
        data = Path(path).parent / info.location
        need = tensor_bytes(tensor)
        offset = info.offset or 0
        if (info.length is not None and info.length != need) or not data.is_file() or \
                data.stat().st_size < offset + need:
            return None
        table = np.memmap(data, dtype=dtype, mode="r", offset=offset, shape=tuple(tensor.dims))
    else:
        table = numpy_helper.to_array(tensor)
    return table, graph.input[0].name, out
