"""Scale the query before Q·Kᵀ instead of the scores after it (any opset).

Pattern (transformers' ``eager_attention_forward`` as exported: ``matmul(q, kᵀ) * scaling``)::

    Q ──> MatMul(·, Kᵀ) ──> Mul(c) | Div(c) ──> [Add(mask)] ──> Softmax ──> MatMul(·, V)

becomes ``Q ──> Mul(c) | Div(c) ──> MatMul(·, Kᵀ) ──> [Add(mask)] ──> Softmax ──> MatMul(·, V)``:
the same product ((c·Q)·Kᵀ = c·(Q·Kᵀ); exact for a power-of-two c, one rounding apart otherwise).

Why: TensorRT's fused attention from primitive layers ("Method 2" of the Fused Attention guide,
docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/transformers-fused-attention.html)
requires Q or K to be multiplied by the attention scale *before* the first batched MatMul (its
ONNX ``Attention`` importer does the same: sqrt(scale) on Q and on K). With the scale after BMM1 the
graph is not the pattern its fusion looks for. Valid at every opset, so TensorRT 8.5 parses it too
(whether 8.5 fuses it is another matter: it does not at 12,432 patches). At opset 23
:class:`~autoglm_build.rewrites.attention.FuseAttention` runs first and leaves nothing to move.
"""

from __future__ import annotations

from typing import Any

from autoglm_build.rewrites.attention import find_attention
from autoglm_build.rewrites.base import GraphRewrite


class ScaleQueryFirst(GraphRewrite):
    name = "scale-query-first"
    anchor = "Softmax"

    def rewrite(self, gs: Any, graph: Any, softmax: Any) -> bool:
        found = find_attention(softmax)
        if found is None or found.scale is None:
            return False
        scale, bmm1 = found.scale, found.bmm1
        query = bmm1.inputs[0]
        factor = next(t for t in scale.inputs if t is not bmm1.outputs[0])
        scaled = gs.Variable(f"{query.name}/scaled", dtype=query.dtype, shape=query.shape)
        graph.nodes.append(gs.Node(scale.op, name=f"{scale.name}/on_query", inputs=[query, factor], outputs=[scaled]))
        bmm1.inputs[0] = scaled
        scores = scale.outputs[0]
        scale.outputs.clear()
        bmm1.outputs.clear()
        bmm1.outputs.append(scores)  # the product now comes out already scaled
        return True
