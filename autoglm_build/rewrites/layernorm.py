"""Decompose ``LayerNormalization`` into primitive ops, for TensorRT < 8.6.

TensorRT 8.5's ONNX parser has no importer for opset 17's ``LayerNormalization`` (it looks for a
plugin of that name and fails); 8.6 and later parse it natively and fuse it, so the engine stage
applies this rewrite only when the running TensorRT is older. Over the last axis::

    mean = ReduceMean(x)          d = x - mean          var = ReduceMean(d * d)
    y = d * (1 / Sqrt(var + eps)) * scale + bias

Constants take the scale's element type, so FP16 islands stay FP16.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from autoglm_build.rewrites.base import GraphRewrite


class DecomposeLayerNorm(GraphRewrite):
    name = "decompose-layernorm"
    anchor = "LayerNormalization"

    def rewrite(self, gs: Any, graph: Any, ln: Any) -> bool:
        if ln.attrs.get("axis", -1) != -1:
            return False  # our graphs normalize the last axis only
        x, scale = ln.inputs[0], ln.inputs[1]
        bias = ln.inputs[2] if len(ln.inputs) > 2 else None
        dtype = scale.values.dtype if isinstance(scale, gs.Constant) else np.float32
        eps = gs.Constant(f"{ln.name}/eps", np.array(ln.attrs.get("epsilon", 1e-5), dtype=dtype))
        one = gs.Constant(f"{ln.name}/one", np.array(1.0, dtype=dtype))
        y = ln.outputs[0]
        ln.outputs.clear()
        graph.nodes.extend(_decomposed(gs, ln.name, x, scale, bias, eps, one, y))
        return True


def _decomposed(gs: Any, name: str, x: Any, scale: Any, bias: Any, eps: Any, one: Any, y: Any) -> list:
    def var(suffix: str) -> Any:
        return gs.Variable(f"{name}/{suffix}")

    mean, d, sq, v, ve, sd, inv, n, ns = (var(s) for s in ("mean", "d", "sq", "var", "var_eps", "std", "inv", "norm",
                                                          "scaled"))
    nodes = [
        gs.Node("ReduceMean", f"{name}/ReduceMean", {"axes": [-1], "keepdims": 1}, [x], [mean]),
        gs.Node("Sub", f"{name}/Sub", inputs=[x, mean], outputs=[d]),
        gs.Node("Mul", f"{name}/Square", inputs=[d, d], outputs=[sq]),
        gs.Node("ReduceMean", f"{name}/Variance", {"axes": [-1], "keepdims": 1}, [sq], [v]),
        gs.Node("Add", f"{name}/AddEps", inputs=[v, eps], outputs=[ve]),
        gs.Node("Sqrt", f"{name}/Sqrt", inputs=[ve], outputs=[sd]),
        gs.Node("Div", f"{name}/Reciprocal", inputs=[one, sd], outputs=[inv]),
        gs.Node("Mul", f"{name}/Normalize", inputs=[d, inv], outputs=[n]),
    ]
    if bias is None:
        nodes.append(gs.Node("Mul", f"{name}/Scale", inputs=[n, scale], outputs=[y]))
    else:
        nodes += [gs.Node("Mul", f"{name}/Scale", inputs=[n, scale], outputs=[ns]),
                  gs.Node("Add", f"{name}/Bias", inputs=[ns, bias], outputs=[y])]
    return nodes
