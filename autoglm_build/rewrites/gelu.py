"""Fuse exact GELU into the standard ``Gelu`` op (opset 20).

Pattern (Whisper's and the vision merger's ``nn.GELU()`` as exported)::

    x ──> Div(√2) ──> Erf ──> Add(1) ──> Mul(x, ·) ──> Mul(0.5) ──> y
    └──────────────────────────────────┘

becomes ``y = Gelu(x)`` (approximate="none"). Below opset 20 the pattern stays: TensorRT fuses
it itself, and a custom/contrib op would not parse.
"""

from __future__ import annotations

from typing import Any, Tuple

import numpy as np

from autoglm_build.rewrites.base import Rewrite


def _const(tensor: Any) -> Any:
    import onnx_graphsurgeon as gs

    return tensor.values if isinstance(tensor, gs.Constant) else None


def _is(value: Any, target: float, tol: float = 1e-3) -> bool:
    return value is not None and np.size(value) == 1 and abs(float(np.asarray(value).reshape(-1)[0]) - target) < tol


def _other(node: Any, tensor: Any) -> Any:
    return node.inputs[1] if node.inputs[0] is tensor else node.inputs[0]


class FuseGelu(Rewrite):
    name = "fuse-gelu"
    min_opset = 20

    def __call__(self, model: Any) -> Tuple[Any, int]:
        import onnx_graphsurgeon as gs

        graph = gs.import_onnx(model)
        count = 0
        for erf in [n for n in graph.nodes if n.op == "Erf"]:
            match = self._match(erf)
            if match is None:
                continue
            x, div, add, mul, half = match
            y = half.outputs[0]
            half.outputs.clear()
            for node in (div, erf, add, mul):
                node.outputs.clear()
            graph.nodes.append(gs.Node("Gelu", name=f"{half.name}/Gelu", inputs=[x], outputs=[y]))
            count += 1
        graph.cleanup().toposort()
        return gs.export_onnx(graph), count

    @staticmethod
    def _match(erf: Any):
        div = erf.inputs[0].inputs[0] if erf.inputs[0].inputs else None
        if div is None or div.op != "Div" or not _is(_const(div.inputs[1]), np.sqrt(2.0)):
            return None
        x = div.inputs[0]
        adds = erf.outputs[0].outputs
        if len(adds) != 1 or adds[0].op != "Add" or not _is(_const(_other(adds[0], erf.outputs[0])), 1.0):
            return None
        add = adds[0]
        muls = add.outputs[0].outputs
        if len(muls) != 1 or muls[0].op != "Mul" or _other(muls[0], add.outputs[0]) is not x:
            return None
        mul = muls[0]
        halves = mul.outputs[0].outputs
        if len(halves) != 1 or halves[0].op != "Mul" or not _is(_const(_other(halves[0], mul.outputs[0])), 0.5):
            return None
        return x, div, add, mul, halves[0]
