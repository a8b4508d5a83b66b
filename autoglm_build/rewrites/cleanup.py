"""Cleanup: constant folding, shape simplification, dead nodes, redundant Identity/Cast (onnxslim).

Our exports carry the TorchScript exporter's shape arithmetic (Shape/Gather/Unsqueeze/Concat
chains over static dims), Identity nodes sharing weights, and Constants. onnxslim folds what is
constant, simplifies shapes and drops what no output needs; it keeps standard ONNX ops only.

    Tiny decoder: 782 nodes -> 294 (Constant -290, Unsqueeze -54, Shape -33, ...)
"""

from __future__ import annotations

from typing import Any, Tuple

from autoglm_build.rewrites.base import Rewrite, hold_large_initializers, restore_initializers

#: a graph whose initializers hold more than this goes through onnxslim with its weights held aside
PROTOBUF_SAFE_BYTES = 1 << 30
#: ... every initializer over this many bytes (a weight matrix, not a shape constant onnxslim folds)
HELD_WEIGHT_BYTES = 1 << 20


class Cleanup(Rewrite):
    """onnxslim over the graph. A graph over :data:`PROTOBUF_SAFE_BYTES` of weights goes through it with
    every weight over :data:`HELD_WEIGHT_BYTES` held aside (:func:`hold_large_initializers`), put back
    after: onnxslim 0.1.98's symbolic shape inference fails on every LayerNormalization node (an
    ``UnboundLocalError`` in ``onnx_infer_single_node``) and its fallback serializes the model, which
    protobuf refuses over 2 GB. The 9B's Whisper encoder (2.7 GB, 65 LayerNorms) stopped there on the
    lease; the decoder's stages (RMSNorm, no LayerNorm) pass its symbolic inference. onnxslim never
    needs the weights' values: it folds shape arithmetic and small constants."""

    name = "cleanup"

    def __call__(self, model: Any) -> Tuple[Any, int]:
        import onnxslim

        before = len(model.graph.node)
        weights = sum(len(t.raw_data) for t in model.graph.initializer if t.HasField("raw_data"))
        held = hold_large_initializers(model, HELD_WEIGHT_BYTES) if weights > PROTOBUF_SAFE_BYTES else {}
        try:
            slimmed = onnxslim.slim(model)
        finally:
            restore_initializers(model, held)
        return restore_initializers(slimmed, held), before - len(slimmed.graph.node)
