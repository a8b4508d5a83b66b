"""Cleanup: constant folding, shape simplification, dead nodes, redundant Identity/Cast (onnxslim).

Our exports carry the TorchScript exporter's shape arithmetic (Shape/Gather/Unsqueeze/Concat
chains over static dims), Identity nodes sharing weights, and Constants. onnxslim folds what is
constant, simplifies shapes and drops what no output needs; it keeps standard ONNX ops only.

    Tiny decoder: 782 nodes -> 294 (Constant -290, Unsqueeze -54, Shape -33, ...)
"""

from __future__ import annotations

from typing import Any, Tuple

from autoglm_build.rewrites.base import Rewrite


class Cleanup(Rewrite):
    name = "cleanup"

    def __call__(self, model: Any) -> Tuple[Any, int]:
        import onnxslim

        before = len(model.graph.node)
        slimmed = onnxslim.slim(model)
        return slimmed, before - len(slimmed.graph.node)
