"""What a graph rewrite is: a callable from a model to a model, counting what it changed."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np


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


class GraphRewrite(Rewrite):
    """A rewrite of patterns anchored on one op, with onnx-graphsurgeon (as onnxruntime's fusion
    classes search ``search_op_types`` and call ``fuse``): :meth:`rewrite` is offered each node of
    ``anchor`` op that was in the graph before the first change; the graph is then cleaned up (the
    replaced nodes, now without outputs, drop out) and sorted."""

    anchor: str = ""

    def __call__(self, model: Any) -> Tuple[Any, int]:
        import onnx_graphsurgeon as gs

        if not any(n.op_type == self.anchor for n in model.graph.node):
            return model, 0
        held = hold_large_initializers(model)
        try:
            graph = gs.import_onnx(model)
            count = sum(1 for node in [n for n in graph.nodes if n.op == self.anchor] if self.rewrite(gs, graph, node))
            graph.cleanup().toposort()
            out = gs.export_onnx(graph)
        finally:
            restore_initializers(model, held)
        return restore_initializers(out, held), count

    def rewrite(self, gs: Any, graph: Any, node: Any) -> bool:
        """Rewrite the pattern at ``node`` in place (new nodes appended to ``graph.nodes``); whether it did."""
        raise NotImplementedError


#: initializers larger than this leave the graph while onnx-graphsurgeon copies it: protobuf cannot copy
#: one message over 2 GB (the 9B's LM head and embedding table are 2.5 GB in FP32), and the rewrites
#: read only small constants
LARGE_INITIALIZER_BYTES = 256 << 20
HELD = "held-by-autoglm-build:"  # the placeholder location of a held initializer


def hold_large_initializers(model: Any, limit: Optional[int] = None, only: Optional[set] = None) -> dict:
    """Take the bytes of initializers over ``limit`` (and, given ``only``, named in it) out of ``model`` (each
    left as an external-data placeholder of its name, shape and type); :func:`restore_initializers` puts
    them back."""
    import onnx

    limit = LARGE_INITIALIZER_BYTES if limit is None else limit
    held = {}
    for tensor in model.graph.initializer:
        if tensor.HasField("raw_data") and len(tensor.raw_data) > limit and (only is None or tensor.name in only):
            held[tensor.name] = tensor.raw_data
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            entry = tensor.external_data.add()
            entry.key, entry.value = "location", f"{HELD}{tensor.name}"
    return held


def restore_initializers(model: Any, held: dict) -> Any:
    """Put held initializer bytes back into ``model`` (the one they came from, or its rewritten copy)."""
    import onnx

    for tensor in model.graph.initializer:
        if tensor.name in held and tensor.data_location == onnx.TensorProto.EXTERNAL:
            del tensor.external_data[:]
            tensor.ClearField("data_location")
            tensor.raw_data = held[tensor.name]
    return model


def constant(tensor: Any) -> Any:
    """A graphsurgeon tensor's values if it is a constant whose bytes are in the graph, else None (a
    large initializer held aside by :func:`hold_large_initializers` is no small constant a rewrite wants)."""
    import onnx_graphsurgeon as gs

    if not isinstance(tensor, gs.Constant):
        return None
    proto = getattr(getattr(tensor, "_values", None), "tensor", None)  # a LazyValues' TensorProto, not loaded
    if proto is not None and any(e.value.startswith(HELD) for e in getattr(proto, "external_data", [])):
        return None
    return tensor.values


def is_scalar(value: Any, target: float, tol: float = 1e-3) -> bool:
    """``value`` (a :func:`constant`'s) is one number within ``tol`` of ``target``."""
    return value is not None and np.size(value) == 1 and abs(float(np.asarray(value).reshape(-1)[0]) - target) < tol


def other_input(node: Any, tensor: Any) -> Any:
    """The input of a two-input ``node`` that is not ``tensor``."""
    return node.inputs[1] if node.inputs[0] is tensor else node.inputs[0]


def opset_of(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
