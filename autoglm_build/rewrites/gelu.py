"""Fuse exact GELU into the standard ``Gelu`` op (opset 20).

Pattern (Whisper's and the vision merger's ``nn.GELU()`` as exported)::

    x ──> Div(√2) ──> Erf ──> Add(1) ──> Mul(x, ·) ──> Mul(0.5) ──> y
    └──────────────────────────────────┘

becomes ``y = Gelu(x)`` (approximate="none"). Below opset 20 the pattern stays: TensorRT fuses
it itself, and a custom/contrib op would not parse.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from autoglm_build.rewrites.base import GraphRewrite, constant, is_scalar, other_input


class FuseGelu(GraphRewrite):
    name = "fuse-gelu"
    min_opset = 20
    anchor = "Erf"

    def rewrite(self, gs: Any, graph: Any, erf: Any) -> bool:
        match = self._match(erf)
        if match is None:
            return False
        x, div, add, mul, half = match
        y = half.outputs[0]
        half.outputs.clear()
        for node in (div, erf, add, mul):
            node.outputs.clear()
        graph.nodes.append(gs.Node("Gelu", name=f"{half.name}/Gelu", inputs=[x], outputs=[y]))
        return True

    @staticmethod
    def _match(erf: Any):
        div = erf.inputs[0].inputs[0] if erf.inputs[0].inputs else None
        if div is None or div.op != "Div" or not is_scalar(constant(div.inputs[1]), np.sqrt(2.0)):
            return None
        x = div.inputs[0]
        adds = erf.outputs[0].outputs
        if len(adds) != 1 or adds[0].op != "Add" or not is_scalar(constant(other_input(adds[0], erf.outputs[0])), 1.0):
            return None
        add = adds[0]
        muls = add.outputs[0].outputs
        if len(muls) != 1 or muls[0].op != "Mul" or other_input(muls[0], add.outputs[0]) is not x:
            return None
        mul = muls[0]
        halves = mul.outputs[0].outputs
        if len(halves) != 1 or halves[0].op != "Mul":
            return None
        if not is_scalar(constant(other_input(halves[0], mul.outputs[0])), 0.5):
            return None
        return x, div, add, mul, halves[0]
