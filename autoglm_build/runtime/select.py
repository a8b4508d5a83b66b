"""The next token of each row chosen by a graph, so that a GPU can choose it (issue 14's plan: docs/decisions.md,
"Next for issue 14"): the first brick, the graph itself, run here by ONNX Runtime. Not yet built into an
engine or called by the scheduler.

Per row, over the vocabulary: OpenAI's penalties (``logits - frequency * counts - presence * (counts > 0)``) and an
additive ``bias`` (0, or -inf for ids the row may not produce: the never-sampled ids, ``</think>`` outside a
thinking span, the stops under ``ignore_eos``), then the ``k`` largest (``TopK``; ``k`` <= 3,840, TensorRT's limit
in every version). A greedy row (temperature <= 0) takes the largest. Any other row is sampled from those ``k`` at
its temperature, cut to its top-p nucleus, by Gumbel-max: ``argmax(log p + g)``, where ``g`` is Gumbel noise the host
draws from the request's own generator (TensorRT ignores ``RandomUniform``'s seed, and has no bitwise ops for a
counter-based generator in the graph). The same seed gives the same noise and so the same tokens, on either backend.
The host sampler draws differently (one uniform number against a cumulative sum over every candidate), so a seeded
request's tokens differ from today's, and the distribution is cut to the ``k`` most probable ids, as TensorRT-LLM's
top-k sampling cuts it.

The nucleus is the ``k`` sorted probabilities' running sum: a matrix product with an upper-triangular ones
matrix, not ``CumSum``. TensorRT 8.5/8.6's parser builds ``CumSum`` as a loop of one iteration per element, and
``ICumulativeLayer`` only arrived in 10.8. An id is kept while the mass before it is below ``top_p``, so the most
probable id is always kept.

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
#: the ops the graph may use: each parsed by TensorRT 8.5 as one layer (no loop, no random numbers)
OPS = {"Add", "ArgMax", "Cast", "Concat", "Constant", "Div", "Gather", "GatherElements", "Greater", "LessOrEqual",
       "Log", "Max", "MatMul", "Mul", "Slice", "Softmax", "Sub", "TopK", "Where", "Less"}


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
    # a sampled row: softmax at its temperature over the k, the nucleus by a running sum, Gumbel-max
    scaled = node("Div", [values, node("Max", ["temperature", tiny], "safe_temperature")], "scaled")
    probs = node("Softmax", [scaled], "probs", axis=-1)
    upper = const("upper", np.triu(np.ones((k, k), np.float32)))  # running[j] = sum of probs[i] for i <= j
    before = node("Sub", [node("MatMul", [probs, upper], "running"), probs], "mass_before")
    keep = node("Less", [before, "top_p"], "keep")
    scores = node("Where", [keep, node("Add", [node("Log", [probs], "log_probs"), "noise"], "perturbed"), ninf],
                  "scores")
    drawn = node("ArgMax", [scores], "drawn", axis=-1, keepdims=1)
    greedy = node("LessOrEqual", ["temperature", zero], "greedy")
    first = node("Slice", [indices, "s0", "s1", "ax1"], "first")
    node("Where", [greedy, first, node("GatherElements", [indices, drawn], "sampled", axis=1)], "ids")
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
