"""Cleanup: constant folding, shape simplification, dead nodes, redundant Identity/Cast (onnxslim).

Our exports carry the TorchScript exporter's shape arithmetic (Shape/Gather/Unsqueeze/Concat
chains over static dims), Identity nodes sharing weights, and Constants. onnxslim folds what is
constant, simplifies shapes and drops what no output needs; it keeps standard ONNX ops only.

    Tiny decoder: 782 nodes -> 294 (Constant -290, Unsqueeze -54, Shape -33, ...)
"""

from __future__ import annotations

from typing import Any, Dict, List, Set, Tuple

from autoglm_build.rewrites.base import Rewrite, hold_large_initializers, restore_initializers

#: a graph with LayerNorms whose initializers hold more than this goes through onnxslim with its weights held aside
PROTOBUF_SAFE_BYTES = 1 << 30
#: ... every weight matrix over this many bytes
HELD_WEIGHT_BYTES = 1 << 20
#: the inputs through which an op reads a weight it never folds: onnxslim reads no value there (a weight that
#: also feeds an Add, Mul, Pad, ... may be read by its dead-node elimination, so it stays)
WEIGHT_INPUTS = {"MatMul": (0, 1), "Gemm": (0, 1), "Conv": (1,), "ConvTranspose": (1,), "Gather": (0,)}


class Cleanup(Rewrite):
    """onnxslim over the graph. A graph with a LayerNormalization and over :data:`PROTOBUF_SAFE_BYTES` of
    weights goes through it with its weight matrices (over :data:`HELD_WEIGHT_BYTES`, read only by the
    :data:`WEIGHT_INPUTS` of their ops) held aside (:func:`hold_large_initializers`), put back after:
    onnxslim 0.1.98's symbolic shape inference fails on every LayerNormalization node (an
    ``UnboundLocalError`` in ``onnx_infer_single_node``) and its fallback serializes the model, which
    protobuf refuses over 2 GB. The 9B's Whisper encoder (2.7 GB, 65 LayerNorms) stopped there on the
    lease; graphs without LayerNorms (the decoder's stages: RMSNorm) pass its symbolic inference as they
    are."""

    name = "cleanup"

    def __call__(self, model: Any) -> Tuple[Any, int]:
        import onnxslim

        before = len(model.graph.node)
        weights = sum(len(t.raw_data) for t in model.graph.initializer if t.HasField("raw_data"))
        held = {}
        if weights > PROTOBUF_SAFE_BYTES and any(n.op_type == "LayerNormalization" for n in model.graph.node):
            held = hold_large_initializers(model, HELD_WEIGHT_BYTES, weight_only_initializers(model))
        try:
            slimmed = onnxslim.slim(model)
        finally:
            restore_initializers(model, held)
        return restore_initializers(slimmed, held), before - len(slimmed.graph.node)


def weight_only_initializers(model: Any) -> Set[str]:
    """The initializers every reader of which takes them through one of its :data:`WEIGHT_INPUTS`."""
    readers: Dict[str, List[bool]] = {}
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            readers.setdefault(name, []).append(k in WEIGHT_INPUTS.get(node.op_type, ()))
    outputs = {o.name for o in model.graph.output}
    return {t.name for t in model.graph.initializer
            if readers.get(t.name) and all(readers[t.name]) and t.name not in outputs}
