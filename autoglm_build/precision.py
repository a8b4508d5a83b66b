"""Precision in the graph: the mixed-precision policy, FP16 islands, what a graph really computes in,
and TensorRT's implicit-INT8 calibration cache (TensorRT <= 10).

TensorRT 11 is strongly typed: a layer runs in the type its inputs have in the ONNX graph. So the
policy is applied to the graph itself — Q/DQ pairs around INT8 layers (onnxruntime.quantization),
Cast-delimited FP16 islands for the layers the policy keeps in FP16 (onnxruntime's float16
converter), FP16 around the Q/DQ pairs where the opset allows it (:func:`fp16_around_qdq`) — and
:func:`census` reads the result back from the graph, not from the config.
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple

import numpy as np

from autoglm_build.rewrites.base import opset_of

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_FLOAT16, _FLOAT, _INT8 = 10, 1, 3
#: The first opset whose QuantizeLinear reads FP16 (with an FP16 scale) and whose DequantizeLinear
#: gives FP16 (the scale's type); below it both are FP32 only. TensorRT 8.5 parses opset <= 17.
FP16_QDQ_OPSET = 19
#: An FP16 scale must be a finite nonzero FP16: the smallest subnormal (2^-24) and the largest finite.
FP16_SCALE_RANGE = (2.0 ** -24, 65504.0)

#: Ops that must not compute in FP16 (the graph-precision check): a normalization's square and mean
#: overflow FP16 for |x| > 256 (x^2 > 65504), and a softmax's exponentials want FP32 sums. Strongly
#: typed TensorRT (10.12+, 11) computes exactly the graph's types, so the graph has to say FP32.
FP32_OPS = ("Pow", "ReduceMean", "LayerNormalization", "RMSNormalization", "Softmax")
#: Ops holding a softmax that say its type themselves: ONNX ``Attention`` (opset 23) computes its
#: softmax in ``softmax_precision``. They convert to FP16 whole, their softmax kept FP32 by that
#: attribute, so TensorRT sees one fused attention and not a Cast-delimited FP32 Softmax island.
FUSED_SOFTMAX_OPS = ("Attention",)
# Elementwise ops between a normalization's reduction and the multiply that applies it.
_NORM_CHAIN_OPS = ("Add", "Sub", "Sqrt", "Div", "Reciprocal", "Mul")


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


def fp32_nodes(model) -> List[str]:
    """Names of the nodes that stay FP32 in every FP16 and INT8 graph: each normalization whole
    (``Pow -> ReduceMean -> Add(eps) -> Sqrt -> Div -> Mul(x, .)`` as RMSNorm exports, the
    decomposed LayerNorm, ``LayerNormalization``/``RMSNormalization``), every ``Softmax`` and
    ``Pow``, and the residual ``Add`` that feeds a normalization (the residual stream stays FP32, as
    strongly typed deployments of GLM/Qwen-VL towers keep it). A fused ``Attention`` is not among
    them: it goes FP16 whole with its softmax in FP32 (:func:`softmax_in_fp32`).

    Unnamed nodes get names first (``<op>_<index>``), so the list can be used as a block list.
    """
    _name_nodes(model)
    nodes = list(model.graph.node)
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in nodes if n.op_type == "Constant" for o in n.output}
    producers = {o: n for n in nodes for o in n.output}
    readers: Dict[str, List] = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    keep = set()
    for node in nodes:
        if node.op_type not in FP32_OPS:
            continue
        keep.add(node.name)
        if node.op_type in ("Pow", "ReduceMean", "LayerNormalization", "RMSNormalization"):
            residual = producers.get(node.input[0])
            if residual is not None and residual.op_type == "Add" and not any(i in constants for i in residual.input):
                keep.add(residual.name)
        if node.op_type != "ReduceMean":
            continue
        current = node  # follow the mean to the node that applies it: the first with a second runtime input
        for _ in range(6):
            users = readers.get(current.output[0], [])
            if len(users) != 1 or users[0].op_type not in _NORM_CHAIN_OPS:
                break
            current = users[0]
            keep.add(current.name)
            if sum(1 for i in current.input if i and i not in constants) > 1:
                break
    return [n.name for n in nodes if n.name in keep]


def fp16_islands(model, fp16_nodes: Iterable[str], fp16_io: Sequence[str] = ()):
    """Convert only ``fp16_nodes`` to FP16 (Casts at their borders), never :func:`fp32_nodes`; I/O and
    every other node stay, except the graph inputs and outputs named in ``fp16_io`` (see :func:`io_to_fp16`)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    keep = set(fp16_nodes) - set(fp32_nodes(model))
    _split_shared_initializers(model, keep)
    _add_value_info(model)
    block = [n.name for n in model.graph.node if n.name not in keep]
    converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=block, disable_shape_infer=True)
    softmax_in_fp32(converted)
    return tidy(io_to_fp16(converted, fp16_io))


def to_fp16(model, fp16_io: Sequence[str] = ()):
    """The graph in FP16 but for :func:`fp32_nodes` (FP32 islands between Casts); graph I/O kept FP32
    except the inputs and outputs named in ``fp16_io`` (the decoder's KV cache), which become FP16."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    block = fp32_nodes(model)
    _add_value_info(model)
    converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=block, disable_shape_infer=True)
    softmax_in_fp32(converted)
    return tidy(io_to_fp16(converted, fp16_io))


def fp16_around_qdq(model, fp16_io: Sequence[str] = ()) -> Tuple[Any, int]:
    """An INT8 Q/DQ graph at opset >= 19 in FP16 around its Q/DQ pairs, as :func:`to_fp16` makes the
    FP16 graph: the scales become FP16 initializers, every QuantizeLinear reads FP16 and every
    DequantizeLinear gives FP16, the float ops between them compute in FP16 but for
    :func:`fp32_nodes` (FP32 between Casts); graph I/O keeps its types but for ``fp16_io``.

    Strongly typed TensorRT (10.12+, 11) computes exactly these types; with FP32 Q/DQ (opset < 19)
    it would run every layer between the pairs in FP32. A scale outside :data:`FP16_SCALE_RANGE`
    (amax/127 below 2^-24: a nearly all-zero weight channel) is clamped into it first, in FP32, so
    the FP16 scale is exact and never 0 or inf; the count is returned for the stage to report.

    Args:
        model: the Q/DQ graph (``quantize_static``'s output), changed in place.
        fp16_io: graph inputs and outputs to retype to FP16 (see :func:`io_to_fp16`).

    Returns:
        The converted graph and how many scale values were clamped.

    Raises:
        ValueError: the graph's opset is below :data:`FP16_QDQ_OPSET`.
        RuntimeError: a Q/DQ node is not FP16 after the conversion (a bug, not the user's).
    """
    if opset_of(model) < FP16_QDQ_OPSET:
        raise ValueError(f"FP16 Q/DQ needs opset >= {FP16_QDQ_OPSET}, the graph has {opset_of(model)}")
    clamped = _clamp_qdq_scales(model)
    converted = to_fp16(model, fp16_io)
    wrong = _qdq_not_fp16(converted)
    if wrong:
        raise RuntimeError(f"Q/DQ nodes not FP16 after the conversion: {wrong[:5]}")
    return converted, clamped


def _clamp_qdq_scales(model) -> int:
    """Clamp every Q/DQ scale initializer into :data:`FP16_SCALE_RANGE`; returns the values changed."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    scales = {n.input[1] for n in model.graph.node if n.op_type in QDQ_OPS and n.input[1] in inits}
    clamped = 0
    for name in sorted(scales):
        values = numpy_helper.to_array(inits[name])
        fixed = np.clip(values, *FP16_SCALE_RANGE).astype(values.dtype)
        changed = int(np.count_nonzero(fixed != values))
        if changed:
            inits[name].CopyFrom(numpy_helper.from_array(fixed, name))
            clamped += changed
    return clamped


def _qdq_not_fp16(model) -> List[str]:
    """Q/DQ nodes with a float input, scale or output that is not FP16."""
    types = _tensor_types(model)
    wrong = []
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            floats = [node.input[0], node.input[1]]
        elif node.op_type == "DequantizeLinear":
            floats = [node.input[1], node.output[0]]
        else:
            continue
        if any(types.get(name) != _FLOAT16 for name in floats):
            wrong.append(node.name)
    return wrong


def io_to_fp16(model, names: Sequence[str]):
    """Retype the FP32 graph inputs and outputs in ``names`` to FP16, with a Cast beside each inside
    the graph; :func:`tidy` then folds the Casts that meet the converter's own (lossless FP16 -> FP32
    -> FP16 round trips). The decoder's KV cache crosses the boundary this way: half the bytes each
    decode step reads and each cache holds."""
    from onnx import helper

    wanted = set(names)
    for value in model.graph.input:
        if value.name in wanted and value.type.tensor_type.elem_type == _FLOAT:
            inner = f"{value.name}__fp32"
            for node in model.graph.node:
                node.input[:] = [inner if i == value.name else i for i in node.input]
            model.graph.node.insert(0, helper.make_node("Cast", [value.name], [inner], to=_FLOAT,
                                                        name=f"{value.name}__to_fp32"))
            value.type.tensor_type.elem_type = _FLOAT16
    for value in model.graph.output:
        if value.name in wanted and value.type.tensor_type.elem_type == _FLOAT:
            inner = f"{value.name}__fp32"
            for node in model.graph.node:
                node.output[:] = [inner if o == value.name else o for o in node.output]
                node.input[:] = [inner if i == value.name else i for i in node.input]
            model.graph.node.append(helper.make_node("Cast", [inner], [value.name], to=_FLOAT16,
                                                     name=f"{value.name}__to_fp16"))
            value.type.tensor_type.elem_type = _FLOAT16
    return model


def softmax_in_fp32(model) -> int:
    """Every :data:`FUSED_SOFTMAX_OPS` node computes its softmax in FP32 (``softmax_precision`` =
    FLOAT), whatever its inputs are; returns how many nodes said otherwise. (onnx-tensorrt's
    ``Attention`` importer reads no ``softmax_precision``: TensorRT's kernel keeps its own accumulation.)"""
    from onnx import helper

    changed = 0
    for node in model.graph.node:
        if node.op_type in FUSED_SOFTMAX_OPS and _softmax_precision(node) != _FLOAT:
            kept = [a for a in node.attribute if a.name != "softmax_precision"]
            del node.attribute[:]
            node.attribute.extend(kept + [helper.make_attribute("softmax_precision", _FLOAT)])
            changed += 1
    return changed


def _softmax_precision(node) -> int:
    return next((a.i for a in node.attribute if a.name == "softmax_precision"), 0)


def fp16_reductions(model) -> List[str]:
    """The graph-precision check: nodes of :data:`FP32_OPS` whose input is FP16 in the graph, and
    :data:`FUSED_SOFTMAX_OPS` nodes with FP16 inputs whose softmax is not FP32 (``"<op> <name>"``
    each). Empty for every graph the precision stage writes."""
    types = _tensor_types(model)
    return [f"{n.op_type} {n.name}" for n in model.graph.node
            if n.input and types.get(n.input[0]) == _FLOAT16
            and (n.op_type in FP32_OPS or (n.op_type in FUSED_SOFTMAX_OPS and _softmax_precision(n) != _FLOAT))]


def _name_nodes(model) -> None:
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"


def tidy(model):
    """What the float16 converter leaves to be fixed: Cast round trips, duplicate Casts, name clashes,
    node order."""
    _unique_node_names(model)
    while (_drop_round_trips(model, _FLOAT, _FLOAT16, assume_unknown=True)  # one fold can expose the next
           + _drop_round_trips(model, _FLOAT16, _FLOAT, assume_unknown=False)):
        pass
    _toposort(model)
    _drop_io_value_info(model)
    return model


def _drop_io_value_info(model) -> None:
    """value_info entries named like a graph input or output: the converter's copies of the FP32 types
    the I/O had before :func:`io_to_fp16`. Readers that merge value_info into I/O types
    (onnx-graphsurgeon: the engine stage's rewrite for TensorRT 8.5) would retype FP16 I/O as FP32."""
    io = {v.name for v in list(model.graph.input) + list(model.graph.output)}
    keep = [v for v in model.graph.value_info if v.name not in io]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)


def _drop_round_trips(model, kept: int, via: int, assume_unknown: bool) -> int:
    """``x -> Cast(via) -> Cast(kept) -> y`` becomes ``x -> y`` where ``x`` is already of type ``kept``
    and the middle tensor has no other reader; where ``y`` is a graph output, an Identity keeps its name.

    Two uses (:func:`tidy`):

    - ``kept`` FP32 via FP16: the float16 converter puts a Cast on each side of every border, so two
      FP32 nodes that it saw through an FP16-typed tensor (a DequantizeLinear feeding a MatMul, say)
      end up joined by a lossy round trip that also hides the Q/DQ pair from TensorRT. A source of
      unknown type counts as FP32 (``assume_unknown``: the converter only casts FP32 tensors to FP16),
      but a declared FP16 one does not (the converter turns a model's own Cast-to-FP32 into a
      Cast-to-FP16 of an FP16 tensor).
    - ``kept`` FP16 via FP32 (exact: FP16 fits in FP32), e.g. an FP16 KV input cast for the converter;
      only where the source is declared FP16.
    """
    from onnx import helper

    to = {n.output[0]: n for n in model.graph.node if n.op_type == "Cast"}
    readers: Dict[str, int] = Counter(i for n in model.graph.node for i in n.input)
    graph_outputs = {o.name for o in model.graph.output}
    known = _declared_types(model)
    drop, identities = set(), []
    for node in model.graph.node:
        if node.op_type != "Cast" or _cast_to(node) != kept:
            continue
        first = to.get(node.input[0])
        if (first is None or id(first) in drop or _cast_to(first) != via or readers[first.output[0]] != 1
                or first.output[0] in graph_outputs
                or known.get(first.input[0], kept if assume_unknown else None) != kept):
            continue
        source = first.input[0]
        if node.output[0] in graph_outputs:  # e.g. an FP32 Softmax feeding a graph output
            identities.append(helper.make_node("Identity", [source], [node.output[0]], name=f"{node.name}__identity"))
        else:
            for reader in model.graph.node:
                reader.input[:] = [source if i == node.output[0] else i for i in reader.input]
        drop.update({id(node), id(first)})
    keep = [n for n in model.graph.node if id(n) not in drop] + identities
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return len(drop)


def _declared_types(model) -> Dict[str, int]:
    """Element types the graph states: inputs, initializers, value_info, and every Cast's output."""
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.value_info)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    types.update({n.output[0]: _cast_to(n) for n in model.graph.node if n.op_type == "Cast"})
    return types


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
    """The float16 converter can emit a border Cast twice (same output, for two readers): keep one of
    nodes that compute the same thing into the same output, and give any other name clash a suffix."""
    produced = {}
    duplicates = []
    for node in model.graph.node:
        key = tuple(node.output)
        if key in produced and _same_computation(produced[key], node):
            duplicates.append(node)
        produced.setdefault(key, node)
    for node in duplicates:
        model.graph.node.remove(node)
    seen: Counter = Counter()
    for node in model.graph.node:
        seen[node.name] += 1
        if seen[node.name] > 1:
            node.name = f"{node.name}_{seen[node.name] - 1}"


def _same_computation(a, b) -> bool:
    """Same op, inputs and attributes (the name may differ: the converter names a border Cast after
    each reader it inserts it for)."""
    return (a.op_type == b.op_type and list(a.input) == list(b.input) and a.domain == b.domain
            and [x.SerializeToString() for x in a.attribute] == [x.SerializeToString() for x in b.attribute])


def qdq_count(model) -> Dict[str, int]:
    ops = Counter(n.op_type for n in model.graph.node)
    return {op: ops.get(op, 0) for op in QDQ_OPS}


def census(model, categories: Mapping[str, Sequence[str]]) -> Dict[str, Dict[str, int]]:
    """Per category, how many of its compute nodes take int8 (behind a DequantizeLinear), fp16 or fp32.

    Read from the graph: an input produced by ``DequantizeLinear`` counts as int8 (TensorRT fuses
    the pair), otherwise the input's element type as ONNX type inference gives it.
    """
    types = _tensor_types(model)
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


def _tensor_types(model) -> Dict[str, int]:
    """Every tensor's element type, by ONNX type inference on a weightless copy."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(_without_weights(model))
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


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
