"""The next token of each row chosen by a graph, so that a GPU can choose it (issue 14's plan: docs/decisions.md,
"Next for issue 14"): the first brick, the graph itself, run here by ONNX Runtime. Not yet built into an
engine or called by the scheduler.

Per row, over the vocabulary: OpenAI's penalties (``logits - frequency * counts - presence * (counts > 0)``) and an
additive ``bias`` (0, or -inf for ids the row may not produce: the never-sampled ids, ``</think>`` outside a
thinking span, the stops under ``ignore_eos``), then the ``k`` largest (``TopK``; ``k`` <= 3,840, TensorRT's limit
in every version). A greedy row (temperature <= 0) takes the largest. Any other row is sampled from those ``k`` at
its temperature, cut to its top-p nucleus, by Gumbel-max: ``argmax(log p + g)``, where ``g`` is Gumbel noise the host
draws from the request's own generator (TensorRT ignores ``RandomUniform``'s seed, and has no bitwise ops for a
counter-based generator in the graph). The same seed gives the same noise and so, almost always, the same tokens on
either backend (numerically near-equal scores may still fall either way). The host sampler draws differently (one
uniform number against a cumulative sum over every candidate), so a seeded request's tokens differ from today's,
and the distribution is cut to the ``k`` most probable ids, as TensorRT-LLM's top-k sampling cuts it.

The nucleus is measured as the host's is, against the whole vocabulary's softmax at the row's temperature (its
log-sum-exp over every id), not against the ``k`` alone: an id is kept while the mass of the more probable ids
before it is below ``top_p`` (so the most probable id is always kept), then the nucleus is cut to the ``k``. The
mass before each of the ``k`` sorted ids is a matrix product with a strictly upper-triangular ones matrix, not
``CumSum``: TensorRT 8.5/8.6's parser builds ``CumSum`` as a loop of one iteration per element. As ``log p`` and the
scaled logits differ by the row's log-sum-exp only, the draw is ``argmax(scaled + g)`` over the kept ids.

Ties: ONNX's ``TopK`` puts the lower id first among equal values, so a greedy row picks what the host sampler's
``argmax`` picks; TensorRT's ``TopK`` makes no such promise, so an engine may pick another of equal logits.

Imports on the GPU harness's Python 3.9 (onnx and numpy only).
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: TensorRT's largest TopK ``k`` (``ITopKLayer::setK`` and the ONNX parser, every version from 8.5 to 10.x)
MAX_K = 3840
#: the graph's inputs, in order, with their shapes (rows = the decode step's batch, vocab = the logits' width)
INPUTS = (("logits", ["rows", "vocab"]), ("bias", ["rows", "vocab"]), ("counts", ["rows", "vocab"]),
          ("penalties", ["rows", 2]), ("temperature", ["rows", 1]), ("top_p", ["rows", 1]), ("noise", ["rows", "k"]))
#: the ops the graph may use: ones TensorRT 8.5's ONNX parser imports (some as a few layers), none a loop and none
#: random (an engine's ``ids`` come out as int32: TensorRT has no int64 tensors)
OPS = {"Add", "ArgMax", "Cast", "Constant", "Div", "Exp", "GatherElements", "Greater", "Less", "Log", "Max", "MatMul",
       "Mul", "ReduceMax", "ReduceSum", "Slice", "Sub", "TopK", "Where"}


def select_graph(k: int = 64, opset: int = 17) -> Any:
    """The select graph (an ``onnx.ModelProto``): inputs :data:`INPUTS` (float32; ``noise`` is (rows, ``k``)),
    output ``ids`` (rows, 1) int64."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if not 1 <= k <= MAX_K:
        raise ValueError(f"select: k {k} is outside 1..{MAX_K} (TensorRT's TopK limit)")
    nodes = []

    def node(op: str, inputs, output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, list(inputs), [output], name=output, **attrs))
        return output

    def const(name: str, value: np.ndarray) -> str:
        nodes.append(helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(value, name)))
        return name

    zero, tiny = const("zero", np.zeros((), np.float32)), const("tiny", np.full((), 1e-6, np.float32))
    ninf = const("ninf", np.full((), -np.inf, np.float32))
    # the penalties and the bias, over the whole vocabulary
    frequency = node("Slice", ["penalties", const("s0", np.array([0])), const("s1", np.array([1])),
                               const("ax1", np.array([1]))], "frequency")
    presence = node("Slice", ["penalties", "s1", const("s2", np.array([2])), "ax1"], "presence")
    seen = node("Cast", [node("Greater", ["counts", zero], "seen_bool")], "seen", to=TensorProto.FLOAT)
    x = node("Sub", [node("Add", ["logits", "bias"], "biased"),
                     node("Add", [node("Mul", ["counts", frequency], "by_count"),
                                  node("Mul", [seen, presence], "by_presence")], "penalty")], "penalized")
    # the k largest, sorted: a greedy row takes the first
    values, indices = "top_values", "top_indices"
    nodes.append(helper.make_node("TopK", [x, const("k", np.array([k], np.int64))], [values, indices], name="topk",
                                  axis=-1, largest=1, sorted=1))
    # a sampled row: the k's probabilities at its temperature against the whole vocabulary's softmax (its
    # log-sum-exp), the nucleus by the mass before each, Gumbel-max over the kept
    temperature = node("Max", ["temperature", tiny], "safe_temperature")
    everything = node("Div", [x, temperature], "scaled_all")
    peak = node("ReduceMax", [everything], "peak", axes=[-1], keepdims=1)
    total = node("ReduceSum", [node("Exp", [node("Sub", [everything, peak], "shifted")], "exp_all"),
                               const("last", np.array([-1], np.int64))], "total", keepdims=1)
    lse = node("Add", [node("Log", [total], "log_total"), peak], "lse")
    scaled = node("Div", [values, temperature], "scaled")
    probs = node("Exp", [node("Sub", [scaled, lse], "log_probs")], "probs")
    before = node("MatMul", [probs, const("upper", np.triu(np.ones((k, k), np.float32), 1))], "mass_before")
    keep = node("Less", [before, "top_p"], "keep")
    scores = node("Where", [keep, node("Add", [scaled, "noise"], "perturbed"), ninf], "scores")
    drawn = node("ArgMax", [scores], "drawn", axis=-1, keepdims=1)
    hot = node("Greater", ["temperature", zero], "hot")
    first = node("Slice", [indices, "s0", "s1", "ax1"], "first")
    node("Where", [hot, node("GatherElements", [indices, drawn], "sampled", axis=1), first], "ids")
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape if name != "noise" else ["rows", k])
              for name, shape in INPUTS]
    graph = helper.make_graph(nodes, "select", inputs, [helper.make_tensor_value_info("ids", TensorProto.INT64,
                                                                                    ["rows", 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="autoglm-build")
    model.ir_version = min(model.ir_version, 8)  # what ONNX Runtime and TensorRT 8.5's parser read
    onnx.checker.check_model(model)
    return model


def gumbel(rng: np.random.Generator, rows: int, k: int) -> np.ndarray:
    """(rows, k) Gumbel noise, ``-log(-log(u))``, from ``rng`` (a request's own generator, a row at a time)."""
    u = rng.random((rows, k))
    return (-np.log(-np.log(np.clip(u, 1e-20, 1.0 - 1e-7)))).astype(np.float32)
