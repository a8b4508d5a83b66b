"""Q/DQ only in front of the ops that run in INT8.

``onnxruntime.quantization`` in QDQ format also hands the DequantizeLinear of a quantized tensor to
that tensor's other consumers (Sigmoid, Mul, Add, Reshape, ...). TensorRT's guidance is Q/DQ at the
inputs of quantizable layers only, and TensorRT 8.5's Myelin aborts on the vision encoder's SiLU fed
by a DequantizeLinear (``operation.cpp:3390: DCHECK(opnd->is_data())``, bisected on the device with
``scripts/trt_qdq_bisect.py``). Those consumers read the float tensor instead: the INT8 layers are
the same, the float ops no longer see the quantization error.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Tuple

from autoglm_build.rewrites.base import Rewrite

Select = Callable[[Any, int, str], bool]


def rewire_qdq_consumers(model: Any, select: Select) -> int:
    """Every input ``i`` of a node that reads ``DQ(Q(x))`` and that ``select(node, i, x)`` picks reads
    ``x`` instead; Q/DQ nodes and initializers left unused are dropped. Returns the inputs rewired."""
    producer = {o: n for n in model.graph.node for o in n.output}
    rewired = 0
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                continue
            if select(node, i, q.input[0]):
                node.input[i] = q.input[0]
                rewired += 1
    rewired += _unquantize_outputs(model, producer)
    if rewired:
        drop_unused(model)
    return rewired


def _unquantize_outputs(model: Any, producer: dict) -> int:
    """A graph output that is ``DQ(Q(x))`` becomes ``x`` itself: nothing of ours consumes a quantized
    graph output (the vision tower's last MatMul writes ``image_embeds`` directly)."""
    count = 0
    for out in model.graph.output:
        dq = producer.get(out.name)
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        source = producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
        if source is None:
            continue
        float_name = q.input[0]
        dq.output[0] = out.name + "_dequantized_unused"
        for node in model.graph.node:
            node.input[:] = [out.name if name == float_name else name for name in node.input]
        source.output[:] = [out.name if name == float_name else name for name in source.output]
        count += 1
    return count


def drop_unused(model: Any) -> None:
    """Remove nodes whose outputs nobody reads (repeatedly), then initializers nobody reads; names read
    inside subgraphs (If/Loop bodies) count as read."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        used = _read_names(graph) | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = _read_names(graph) | outputs
    for init in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(init)


def _read_names(graph: Any) -> set:
    names = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                names |= _read_names(sub) | {o.name for o in sub.output}
    return names


class QDQOnlyOnQuantizedOps(Rewrite):
    """Consumers of a Q/DQ pair whose op type is not quantized read the float tensor."""

    name = "qdq-only-on-quantized-ops"

    def __init__(self, op_types: Sequence[str]) -> None:
        self.op_types = frozenset(op_types)

    def __call__(self, model: Any) -> Tuple[Any, int]:
        return model, rewire_qdq_consumers(model, lambda node, i, source: node.op_type not in self.op_types)
