"""Fuse RMSNorm into the standard ``RMSNormalization`` op (opset 23).

Pattern (transformers' ``Glm4vRMSNorm`` as exported, weight multiply optional)::

    x ──> Pow(2) ──> ReduceMean(-1) ──> Add(eps) ──> Sqrt ──> Div(1, ·) ──> Mul(x, ·) ──> [Mul(w)] ──> y
    └──────────────────────────────────────────────────────────────────────┘

becomes ``y = RMSNormalization(x, w, epsilon=eps, axis=-1)`` (w = ones when there was no weight
multiply, e.g. a norm weight of exactly 1 folded away). Below opset 23 the pattern stays: TensorRT
fuses it itself; keep its reductions in FP32 when building FP16 (the precision stage does).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from autoglm_build.rewrites.base import GraphRewrite, constant, is_scalar, other_input


def _only(tensor: Any, op: str) -> Optional[Any]:
    users = tensor.outputs
    return users[0] if len(users) == 1 and users[0].op == op else None


class FuseRMSNorm(GraphRewrite):
    name = "fuse-rmsnorm"
    min_opset = 23
    anchor = "ReduceMean"

    def rewrite(self, gs: Any, graph: Any, mean: Any) -> bool:
        match = self._match(mean)
        if match is None:
            return False
        x, eps, chain, last, weight = match
        y = last.outputs[0]
        last.outputs.clear()
        for node in chain:
            node.outputs.clear()
        if weight is None:
            weight = gs.Constant(f"{mean.name}/rms_scale", np.ones(x.shape[-1], dtype=np.float32))
        graph.nodes.append(gs.Node("RMSNormalization", name=f"{mean.name}/RMSNormalization",
                                   attrs={"epsilon": float(eps), "axis": -1}, inputs=[x, weight], outputs=[y]))
        return True

    @staticmethod
    def _match(mean: Any):
        pow_ = mean.inputs[0].inputs[0] if mean.inputs[0].inputs else None
        if pow_ is None or pow_.op != "Pow" or not is_scalar(constant(pow_.inputs[1]), 2.0):
            return None
        x = pow_.inputs[0]
        if x.shape is None or not isinstance(x.shape[-1], int):
            return None
        add = _only(mean.outputs[0], "Add")
        eps = constant(other_input(add, mean.outputs[0])) if add is not None else None
        sqrt = _only(add.outputs[0], "Sqrt") if eps is not None and np.size(eps) == 1 else None
        div = _only(sqrt.outputs[0], "Div") if sqrt is not None else None
        if div is None or div.inputs[1] is not sqrt.outputs[0] or not is_scalar(constant(div.inputs[0]), 1.0):
            return None
        mul = _only(div.outputs[0], "Mul")
        if mul is None or other_input(mul, div.outputs[0]) is not x:
            return None
        chain, last, weight = [pow_, mean, add, sqrt, div], mul, None
        scale = _only(mul.outputs[0], "Mul")
        w = constant(other_input(scale, mul.outputs[0])) if scale is not None else None
        if w is not None and np.ndim(w) == 1 and w.shape[0] == x.shape[-1]:
            chain, last, weight = chain + [mul], scale, other_input(scale, mul.outputs[0])
        return x, float(np.asarray(eps).reshape(-1)[0]), chain, last, weight
