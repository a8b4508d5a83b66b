"""Precision in the graph: the mixed-precision policy, FP16 islands, what a graph really computes in,
and TensorRT's implicit-INT8 calibration cache (TensorRT <= 10).

TensorRT 11 is strongly typed: a layer runs in the type its inputs have in the ONNX graph. So the
policy is applied to the graph itself — Q/DQ pairs around INT8 layers (onnxruntime.quantization),
Cast-delimited FP16 islands for the layers the policy keeps in FP16 (onnxruntime's float16
converter) — and :func:`census` reads the result back from the graph, not from the config.
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

import numpy as np

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_FLOAT16, _FLOAT, _INT8 = 10, 1, 3


def matches(node, patterns: Sequence[str]) -> bool:
    """``op:Softmax`` matches an op type; anything else is a regex searched in the node's name."""
    for pattern in patterns:
        if pattern.startswith("op:"):
            if node.op_type == pattern[3:]:
                return True
        elif re.search(pattern, node.name):
            return True
    return False


def policy_nodes(model, patterns: Sequence[str]) -> List[str]:
    """Names of the nodes the FP16 policy covers."""
    return [n.name for n in model.graph.node if n.name and matches(n, patterns)]


def fp16_islands(model, fp16_nodes: Iterable[str]):
    """Convert only ``fp16_nodes`` to FP16 (Casts at their borders); I/O and every other node stay."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    keep = set(fp16_nodes)
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    _split_shared_initializers(model, keep)
    _add_value_info(model)
    block = [n.name for n in model.graph.node if n.name not in keep]
    converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=block, disable_shape_infer=True)
    return tidy(converted)


def to_fp16(model):
    """The whole graph in FP16 (I/O kept FP32), ops without FP16 kernels in ONNX Runtime blocked."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    _add_value_info(model)
    return tidy(convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True))


def tidy(model):
    """What the float16 converter leaves to be fixed: Cast round trips, duplicate Casts, name clashes,
    node order."""
    _unique_node_names(model)
    while _drop_cast_round_trips(model):  # folding one round trip can expose the next
        pass
    _toposort(model)
    return model


def _drop_cast_round_trips(model) -> int:
    """``x -> Cast(fp16) -> Cast(fp32) -> y`` becomes ``x -> y`` where x is already FP32.

    The float16 converter puts a Cast on each side of every border, so two FP32 nodes that it saw
    through an FP16-typed tensor (a DequantizeLinear feeding a MatMul, say) end up joined by a
    lossy round trip that also hides the Q/DQ pair from TensorRT.
    """
    to = {n.output[0]: n for n in model.graph.node if n.op_type == "Cast"}
    readers: Dict[str, int] = Counter(i for n in model.graph.node for i in n.input)
    graph_outputs = {o.name for o in model.graph.output}
    drop = set()
    for node in model.graph.node:
        if node.op_type != "Cast" or _cast_to(node) != _FLOAT:
            continue
        first = to.get(node.input[0])
        if first is None or _cast_to(first) != _FLOAT16 or readers[first.output[0]] != 1:
            continue
        source = first.input[0]  # FP32: the converter only casts FP32 tensors to FP16
        if node.output[0] in graph_outputs:
            continue
        for reader in model.graph.node:
            reader.input[:] = [source if i == node.output[0] else i for i in reader.input]
        drop.update({id(node), id(first)})
    keep = [n for n in model.graph.node if id(n) not in drop]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return len(drop)


def _cast_to(node) -> int:
    return next((a.i for a in node.attribute if a.name == "to"), -1)


def _toposort(model) -> None:
    """Order nodes so that each comes after the producers of its inputs (ONNX requires it)."""
    available = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    pending = list(model.graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ValueError(f"graph has a cycle or a dangling input near node {pending[0].name}")
        ready_ids = {id(n) for n in ready}
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [n for n in pending if id(n) not in ready_ids]
    copies = [type(n)() for n in ordered]
    for copy, node in zip(copies, ordered):
        copy.CopyFrom(node)
    del model.graph.node[:]
    model.graph.node.extend(copies)


def _split_shared_initializers(model, keep: set) -> None:
    """Give FP16 nodes their own copy of a float initializer that FP32 nodes also read.

    The float16 converter keeps such an initializer FP32 and then feeds it, uncast, to the FP16
    node (e.g. a LayerNorm scale the exporter also routes through an Identity).
    """
    inits = {t.name: t for t in model.graph.initializer if t.data_type == _FLOAT}
    readers: Dict[str, List] = {}
    for node in model.graph.node:
        for name in node.input:
            if name in inits:
                readers.setdefault(name, []).append(node)
    for name, nodes in readers.items():
        fp16 = [n for n in nodes if n.name in keep]
        if fp16 and len(fp16) < len(nodes):
            copy = model.graph.initializer.add()
            copy.CopyFrom(inits[name])
            copy.name = f"{name}__fp16"
            for node in fp16:
                node.input[:] = [copy.name if i == name else i for i in node.input]


def _unique_node_names(model) -> None:
    """The float16 converter can emit the border Cast of a shared initializer twice (same name, same
    output): keep one of identical nodes, and give any other name clash a suffix."""
    produced = {}
    duplicates = []
    for node in model.graph.node:
        key = tuple(node.output)
        if key in produced and produced[key].SerializeToString() == node.SerializeToString():
            duplicates.append(node)
        produced.setdefault(key, node)
    for node in duplicates:
        model.graph.node.remove(node)
    seen: Counter = Counter()
    for node in model.graph.node:
        seen[node.name] += 1
        if seen[node.name] > 1:
            node.name = f"{node.name}_{seen[node.name] - 1}"


def qdq_count(model) -> Dict[str, int]:
    ops = Counter(n.op_type for n in model.graph.node)
    return {op: ops.get(op, 0) for op in QDQ_OPS}


def census(model, categories: Mapping[str, Sequence[str]]) -> Dict[str, Dict[str, int]]:
    """Per category, how many of its compute nodes take int8 (behind a DequantizeLinear), fp16 or fp32.

    Read from the graph: an input produced by ``DequantizeLinear`` counts as int8 (TensorRT fuses
    the pair), otherwise the input's element type as ONNX type inference gives it.
    """
    import onnx

    inferred = onnx.shape_inference.infer_shapes(_without_weights(model))
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    result: Dict[str, Dict[str, int]] = {}
    for category, patterns in categories.items():
        counts: Counter = Counter()
        for node in model.graph.node:
            if node.op_type in QDQ_OPS + ("Cast",) or not matches(node, patterns):
                continue
            first = node.input[0] if node.input else ""
            if producers.get(first) == "DequantizeLinear":
                counts["int8"] += 1
            elif types.get(first) in (_FLOAT16, _FLOAT):  # shape arithmetic (int64) is not compute
                counts["fp16" if types[first] == _FLOAT16 else "fp32"] += 1
        result[category] = dict(counts)
    return result


def _add_value_info(model) -> None:
    """Types of every intermediate tensor, inferred on a weightless copy (works past 2 GB), so the
    float16 converter knows where to put border Casts without running shape inference itself."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(_without_weights(model))
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)


def _without_weights(model):
    """A copy with initializer data dropped (type inference needs no weights; keeps 2 GB models small)."""
    import onnx

    light = onnx.ModelProto()
    light.CopyFrom(model)
    for t in light.graph.initializer:
        t.ClearField("raw_data")
        t.ClearField("float_data")
        t.ClearField("int32_data")
        t.ClearField("data_location")
        del t.external_data[:]
    return light


# ---- TensorRT's calibration cache (implicit INT8, TensorRT 8.x-10) ---------------------------
#
# TensorRT 11 removed implicit INT8 (calibrators, the INT8 flag): there the Q/DQ graph is the only
# way, and this cache is for TensorRT <= 10 only.

# calibrate.method -> the calibrator whose cache TensorRT would write: entropy is IInt8EntropyCalibrator2,
# minmax IInt8MinMaxCalibrator, percentile the quantile-based IInt8LegacyCalibrator.
TRT_CALIBRATORS = {"entropy": "EntropyCalibration2", "minmax": "MinMaxCalibration", "percentile": "LegacyCalibration"}


def trt_version_number(trt_version: str) -> int:
    """``NV_TENSORRT_VERSION``: major*1000 + minor*100 + patch below 10 (8.5.3 -> 8503), major*10000 +
    minor*100 + patch from 10.0 (10.3.0 -> 100300; NvInferRuntimeBase.h's ``NV_TENSORRT_VERSION_INT``)."""
    major, minor, patch = [int(p) for p in (trt_version.split(".") + ["0", "0"])[:3]]
    return major * (10000 if major >= 10 else 1000) + minor * 100 + patch


def trt_cache_header(trt_version: str, method: str = "entropy") -> str:
    """``TRT-8503-EntropyCalibration2`` for TensorRT 8.5.3 and entropy, ``TRT-100300-MinMaxCalibration``
    for 10.3.0 and minmax.

    Raises:
        ValueError: TensorRT 11 or later (no implicit INT8 there), or an unknown method.
    """
    if int(trt_version.split(".")[0]) >= 11:
        raise ValueError(f"TensorRT {trt_version} has no calibrators: the calibration cache is for TensorRT <= 10")
    return f"TRT-{trt_version_number(trt_version)}-{TRT_CALIBRATORS[method]}"


def write_trt_cache(path: Path, ranges: Mapping[str, Tuple[float, float]], header: str) -> int:
    """One ``tensor: hex`` line per tensor, the hex being the big-endian float32 scale amax/127.

    Returns the number of tensors written. Tensors with no range (all zeros) are skipped, as
    TensorRT's calibrator skips them.
    """
    lines = [header]
    for name, (lo, hi) in sorted(ranges.items()):
        amax = max(abs(float(lo)), abs(float(hi)))
        if amax > 0 and np.isfinite(amax):
            lines.append(f"{name}: {struct.pack('>f', amax / 127.0).hex()}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines) - 1


def read_trt_cache(path: Path) -> Tuple[str, Dict[str, float]]:
    """(header, {tensor: scale}) from a TensorRT calibration cache."""
    header, *rows = Path(path).read_text(encoding="utf-8").splitlines()
    scales = {}
    for row in rows:
        name, _, hexval = row.rpartition(": ")
        scales[name] = struct.unpack(">f", bytes.fromhex(hexval))[0]
    return header, scales
