"""Precision in the graph: the mixed-precision policy, FP16 islands, what a graph really computes in,
and TensorRT's implicit-INT8 calibration cache.

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
    block = [n.name for n in model.graph.node if n.name not in keep]
    converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=block, disable_shape_infer=True)
    _unique_node_names(converted)
    return converted


def _unique_node_names(model) -> None:
    """The float16 converter can name two border Casts of one shared initializer alike; ONNX forbids it."""
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


def trt_cache_header(trt_version: str, method: str = "EntropyCalibration2") -> str:
    """``TRT-8503-EntropyCalibration2`` for TensorRT 8.5.3 (TensorRT writes its version as MMmp)."""
    parts = [int(p) for p in (trt_version.split(".") + ["0", "0"])[:3]]
    return f"TRT-{parts[0]}{parts[1]:02d}{parts[2]}-{method}"


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
