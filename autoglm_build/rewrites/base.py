"""What a graph rewrite is: a callable from a model to a model, counting what it changed."""

from __future__ import annotations

from typing import Any, Optional, Tuple


class Rewrite:
    """One graph rewrite.

    ``min_opset`` is the opset whose standard ops the rewrite targets; below it the rewrite is
    skipped and :meth:`skip_reason` says why (TensorRT fuses the unfused pattern itself).
    """

    name: str = ""
    min_opset: int = 1

    def skip_reason(self, opset: int) -> Optional[str]:
        if opset < self.min_opset:
            return f"needs opset >= {self.min_opset} for its standard op (graph has {opset})"
        return None

    def __call__(self, model: Any) -> Tuple[Any, int]:
        """Returns the rewritten model and how many patterns (or nodes) it changed."""
        raise NotImplementedError


def opset_of(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
