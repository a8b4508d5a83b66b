"""Fuse attention into the standard ``Attention`` op (opset 23), softmax in FP32.

Pattern (transformers' ``eager_attention_forward`` as exported; scale and mask optional)::

    Q ─────────────────────────> MatMul ──> Mul(scale) ──> Add(mask) ──> Softmax(-1) ──> MatMul ──> Y
    K ──> [repeat_kv] ──> Transpose(0,1,3,2) ──┘                                           │
    V ──> [repeat_kv] ─────────────────────────────────────────────────────────────────────┘

becomes ``Y = Attention(Q, K, V, mask, scale=scale, softmax_precision=FLOAT)``. The mask stays the
additive float mask the graph computes (the vision tower's block-diagonal one that keeps the images
of a pack apart). ``repeat_kv`` (``Unsqueeze(2) -> Expand -> Reshape``, grouped-query heads) is
dropped: the op takes K/V with fewer heads than Q and pairs them as ``repeat_kv`` does (query head h
reads KV head h // group).

Only attentions where no query row can be fully masked are fused: no mask, or a mask that allows
the diagonal, ``Where(Equal(x[:, None], x[None, :]), 0, -big)`` (the vision tower's image mask:
every patch sees itself). On a fully masked row the unfused graph averages V uniformly while ONNX
Runtime's ``Attention`` gives 0 and TensorRT's fused kernel is undocumented; the decoder's causal +
left-padding mask has such rows (padding positions), so the decoder stays unfused (docs/decisions.md).

Why: TensorRT >= 10.14 parses ``Attention`` into ``IAttention``, which it tries to run as one fused
kernel instead of materializing the (heads, S, S) scores as TensorRT 8.5 does at 12,432 patches
(58 ms for two full-width layers against torch sdpa's 16.8 ms on an H200). ``softmax_precision``
FLOAT keeps issue 18's guarantee (softmax in FP32) inside the fused op, so the FP16 graph converts
the op whole instead of leaving an FP32 Softmax island between Casts, which TensorRT's primitive
attention pattern is not documented to accept. Below opset 23 the pattern stays (see
:class:`~autoglm_build.rewrites.attention_scale.ScaleQueryFirst`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np

from autoglm_build.rewrites.base import GraphRewrite, constant

#: ``softmax_precision``: the ONNX type the op's softmax computes in (TensorProto.FLOAT)
SOFTMAX_FP32 = 1


@dataclass
class ScoredAttention:
    """One attention as exported: ``bmm1 -> [scale] -> [add(mask)] -> softmax -> bmm2``."""

    bmm1: Any
    scale: Optional[Any]  # the Mul/Div applying the scale to bmm1's output
    factor: float  # what the scores are multiplied by (1.0 without a scale node)
    mask: Optional[Any]
    softmax: Any
    bmm2: Any


def _producer(tensor: Any) -> Optional[Any]:
    return tensor.inputs[0] if tensor.inputs else None


def _only_reader(tensor: Any, node: Any) -> bool:
    return len(tensor.outputs) == 1 and tensor.outputs[0] is node


def _rank(tensor: Any) -> Optional[int]:
    return len(tensor.shape) if tensor.shape is not None else None


def _product(tensor: Any):
    """``tensor`` as ``MatMul(..) [* c | / c]`` read only along the chain: (bmm1, scale node, factor)."""
    node = _producer(tensor)
    if node is None or len(tensor.outputs) != 1:
        return None
    if node.op == "MatMul":
        return node, None, 1.0
    if node.op not in ("Mul", "Div"):
        return None
    for i in ((0, 1) if node.op == "Mul" else (0,)):
        inner, value = node.inputs[i], constant(node.inputs[1 - i])
        bmm1 = _producer(inner)
        if value is None or np.size(value) != 1 or bmm1 is None or bmm1.op != "MatMul" or not _only_reader(inner, node):
            continue
        c = float(np.asarray(value).reshape(-1)[0])
        if c != 0.0:
            return bmm1, node, (c if node.op == "Mul" else 1.0 / c)
    return None


def find_attention(softmax: Any) -> Optional[ScoredAttention]:
    """The attention around ``softmax`` (a rank-4 Softmax over the last axis), or None."""
    scores = softmax.inputs[0]
    if softmax.op != "Softmax" or _rank(scores) != 4 or softmax.attrs.get("axis", -1) not in (-1, 3):
        return None
    readers = softmax.outputs[0].outputs
    if len(readers) != 1 or readers[0].op != "MatMul" or readers[0].inputs[0] is not softmax.outputs[0]:
        return None
    add, mask, found = _producer(scores), None, None
    if add is not None and add.op == "Add" and _only_reader(scores, softmax):
        for i in (0, 1):
            found = _product(add.inputs[i])
            if found is not None:
                mask = add.inputs[1 - i]
                break
    else:
        found = _product(scores)
    if found is None:
        return None
    bmm1, scale, factor = found
    return ScoredAttention(bmm1, scale, factor, mask, softmax, readers[0])


def _unrepeat(tensor: Any) -> Optional[Tuple[Any, int]]:
    """``repeat_kv``'s input and group size when ``tensor`` is ``Reshape(Expand(Unsqueeze(x, 2)))``
    from (b, kv, s, d) to (b, kv * group, s, d), as transformers exports it; else None."""
    reshape = _producer(tensor)
    expand = _producer(reshape.inputs[0]) if reshape is not None and reshape.op == "Reshape" else None
    unsqueeze = _producer(expand.inputs[0]) if expand is not None and expand.op == "Expand" else None
    if unsqueeze is None or unsqueeze.op != "Unsqueeze" or len(unsqueeze.inputs) < 2:
        return None
    axes, source, wide = constant(unsqueeze.inputs[1]), unsqueeze.inputs[0], expand.outputs[0].shape
    if axes is None or list(np.asarray(axes).reshape(-1)) != [2] or _rank(source) != 4 or wide is None:
        return None
    kv, group, heads = source.shape[1], wide[2] if len(wide) == 5 else None, tensor.shape[1]
    if not all(isinstance(d, int) for d in (kv, group, heads)) or wide[1] != kv or kv * group != heads:
        return None
    return source, group


def _unsqueezed(tensor: Any) -> Optional[Tuple[Any, list]]:
    node = _producer(tensor)
    if node is None or node.op != "Unsqueeze" or len(node.inputs) < 2 or constant(node.inputs[1]) is None:
        return None
    return node.inputs[0], [int(a) for a in np.asarray(constant(node.inputs[1])).reshape(-1)]


def keeps_the_diagonal(mask: Any) -> bool:
    """Whether the additive ``mask`` lets every query row attend to something: it is
    ``[Unsqueeze](Where(Equal(x[:, None], x[None, :]), 0, c))`` for one vector ``x`` (x_i == x_i)."""
    where = _producer(mask)
    if where is not None and where.op == "Unsqueeze":
        where = _producer(where.inputs[0])
    if where is None or where.op != "Where" or not _is_zero(where.inputs[1]):
        return False
    equal = _producer(where.inputs[0])
    if equal is None or equal.op != "Equal":
        return False
    a, b = (_unsqueezed(t) for t in equal.inputs)
    return (a is not None and b is not None and a[0] is b[0] and _rank(a[0]) == 1
            and sorted([a[1], b[1]]) == [[0], [1]])


def _is_zero(tensor: Any) -> bool:
    value = constant(tensor)
    return value is not None and np.size(value) == 1 and float(np.asarray(value).reshape(-1)[0]) == 0.0


class FuseAttention(GraphRewrite):
    name = "fuse-attention"
    min_opset = 23
    anchor = "Softmax"

    def rewrite(self, gs: Any, graph: Any, softmax: Any) -> bool:
        found = find_attention(softmax)
        qkv = self._inputs(found) if found is not None else None
        if qkv is None:
            return False
        y = found.bmm2.outputs[0]
        found.bmm2.outputs.clear()
        inputs = list(qkv) + ([found.mask] if found.mask is not None else [])
        attrs = {"scale": float(found.factor), "softmax_precision": SOFTMAX_FP32}
        graph.nodes.append(gs.Node("Attention", name=f"{softmax.name}/Attention", inputs=inputs, attrs=attrs,
                                   outputs=[y]))
        return True

    @staticmethod
    def _inputs(found: ScoredAttention) -> Optional[Tuple[Any, Any, Any]]:
        """Q, K, V as the op takes them (rank 4; K and V before ``repeat_kv``), or None."""
        q, keys_t, v = found.bmm1.inputs[0], found.bmm1.inputs[1], found.bmm2.inputs[1]
        transpose = _producer(keys_t)
        if transpose is None or transpose.op != "Transpose" or list(transpose.attrs.get("perm", [])) != [0, 1, 3, 2]:
            return None
        k = transpose.inputs[0]
        if any(_rank(t) != 4 for t in (q, k, v)):
            return None  # TensorRT's importer takes rank-4 Q/K/V and mask only
        if found.mask is not None and (_rank(found.mask) != 4 or not keeps_the_diagonal(found.mask)):
            return None
        k_kv, v_kv = _unrepeat(k), _unrepeat(v)
        if k_kv is not None and v_kv is not None and k_kv[1] == v_kv[1]:
            k, v = k_kv[0], v_kv[0]
        return q, k, v
