"""The next token of each row chosen by a graph, so that the GPU chooses it and the next decode step can be
launched before the host has this one's tokens (issue 14: docs/decisions.md, "Token selection on the GPU, one
step ahead"). The TensorRT server builds it into an engine of its own (:mod:`~autoglm_build.runtime.device_select`)
run right after the decoder's last part; ONNX Runtime runs the same graph in the tests.

Per row, over the vocabulary: OpenAI's penalties (``logits - frequency * counts - presence * (counts > 0)``) and an
additive ``bias`` (0, or -inf for ids the row may not produce: the never-sampled ids, the stops under
``ignore_eos``); ``</think>`` barred outside a thinking span (the row's ``state``); then the ``k`` largest (``TopK``;
``k`` <= 3,840, TensorRT's limit in every version). A greedy row (temperature <= 0) takes the largest. Any other row
is sampled from those ``k`` at its temperature, cut to its top-p nucleus, by Gumbel-max: ``argmax(log p + g)``, where
``g`` is Gumbel noise the host draws from the request's own generator (TensorRT ignores ``RandomUniform``'s seed, and
has no bitwise ops for a counter-based generator in the graph). The same seed gives the same noise and so, almost
always, the same tokens on either backend (numerically near-equal scores may still fall either way). The host
sampler draws differently (one uniform number against a cumulative sum over every candidate), so a seeded request's
tokens differ between the two, and the distribution is cut to the ``k`` most probable ids, as TensorRT-LLM's top-k
sampling cuts it.

The nucleus is measured as the host's is, against the whole vocabulary's softmax at the row's temperature (its
log-sum-exp over every id), not against the ``k`` alone: an id is kept while the mass of the more probable ids
before it is below ``top_p`` (so the most probable id is always kept), then the nucleus is cut to the ``k``. The
mass before each of the ``k`` sorted ids is a matrix product with a strictly upper-triangular ones matrix, not
``CumSum``: TensorRT 8.5/8.6's parser builds ``CumSum`` as a loop of one iteration per element. As ``log p`` and the
scaled logits differ by the row's log-sum-exp only, the draw is ``argmax(scaled + g)`` over the kept ids.

**The row's state moves with its tokens, in the graph**, so that a step launched before the host saw the previous
one's token still selects under the right rules (the host's ``Scheduler._advance``, step for step):

- ``counts_out = counts + onehot(id)``: the penalties' counts;
- ``state = (thinking, left)``: in a thinking span ``</think>`` may be produced, outside it not; ``left`` reasoning
  tokens before ``</think>`` is forced (the thinking budget). A thinking row with ``left <= 0`` takes ``</think>``;
  ``thinking_out = thinking and id != </think>``, ``left_out = left - thinking_out``.

Ties: a greedy row takes ``ArgMax`` of its penalized logits, the lowest id among equal values on ONNX Runtime, as the
host sampler's ``argmax``; TensorRT's ``ArgMax`` (a ``TopK`` of one) makes no such promise, so an engine may pick
another of exactly equal logits.

Imports on the GPU harness's Python 3.9 (onnx and numpy only).
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: TensorRT's largest TopK ``k`` (``ITopKLayer::setK`` and the ONNX parser, every version from 8.5 to 10.x)
MAX_K = 3840
#: the graph's inputs, in order, with their shapes (rows = the decode step's batch, vocab = the logits' width).
#: ``params``: temperature, top_p, frequency penalty, presence penalty; ``state``: thinking (1 or 0), reasoning
#: tokens left before ``</think>`` is forced
INPUTS = (("logits", ["rows", "vocab"]), ("bias", ["rows", "vocab"]), ("counts", ["rows", "vocab"]),
          ("params", ["rows", 4]), ("state", ["rows", 2]), ("noise", ["rows", "k"]))
#: the graph's outputs: the ids (int64 in the graph; int32 in a TensorRT 8.5 engine, as its ``input_ids``), the
#: counts and the state after them
OUTPUTS = ("ids", "counts_out", "state_out")
#: the ops the graph may use: ones TensorRT 8.5's ONNX parser imports (some as a few layers), none a loop and none
#: random
OPS = {"Add", "And", "ArgMax", "Cast", "Concat", "Constant", "Div", "Equal", "Exp", "GatherElements", "Greater",
       "Less", "Log", "Max", "MatMul", "Mul", "Not", "ReduceMax", "ReduceSum", "Reshape", "Slice", "Sub", "TopK",
       "Where"}
#: the widest run of ids one ``TopK``/``ArgMax``/reduction takes in one pass: a wider vocabulary (the 9B's 151,552) is
#: cut into groups of at most this many, reduced per group and then over the groups (:func:`groups_of`)
GROUP = 2048


def groups_of(vocab: int, k: int) -> int:
    """The width of the groups the vocabulary's reductions run over (1: none, one pass): the largest divisor of
    ``vocab`` of at most :data:`GROUP` ids and at least ``4 * k``, where ``vocab`` is wider than ``2 * GROUP``.

    On the GPU a reduction over one row's whole vocabulary is one row's worth of parallel work: on the H200 the
    select engine took 0.85 ms a step at 151,552 ids, whether over 1 row or 8, 93-96 % of it in the one fused node
    that holds the vocabulary-wide TopK, ArgMax and sums (``scripts/trt_select_profile.py``; docs/benchmarks.md,
    eighth session). Cut into groups, each row is ``vocab / group`` rows of parallel work, then a small pass over
    the groups' results: the same values, ids and sums."""
    if vocab <= 2 * GROUP:
        return 1
    for width in range(GROUP, 4 * k - 1, -1):
        if vocab % width == 0:
            return width
    return 1


def select_graph(k: int = 64, vocab: int = 0, close: int = 0, logits_dtype: Any = np.float32, opset: int = 17,
                 split: bool = True) -> Any:
    """The select graph (an ``onnx.ModelProto``): inputs :data:`INPUTS` (float32 but ``logits``, of
    ``logits_dtype``: the decoder's own), outputs :data:`OUTPUTS`. ``vocab``: the logits' width (the one-hot of
    the counts and the ``</think>`` column are constants that wide); ``close``: ``</think>``'s id. ``split``: the
    vocabulary-wide passes per group of ids where it is wide (:func:`groups_of`; False: one pass each)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if not 1 <= k <= MAX_K:
        raise ValueError(f"select: k {k} is outside 1..{MAX_K} (TensorRT's TopK limit)")
    if not 0 <= close < vocab or k > vocab:
        raise ValueError(f"select: vocab {vocab} must hold </think> ({close}) and the k ({k})")
    nodes = []

    def node(op: str, inputs, output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, list(inputs), [output], name=output, **attrs))
        return output

    def const(name: str, value: np.ndarray) -> str:
        nodes.append(helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(value, name)))
        return name

    def column(source: str, i: int, name: str) -> str:
        return node("Slice", [source, const(f"{name}_from", np.array([i])), const(f"{name}_to", np.array([i + 1])),
                              "ax1"], name)

    const("ax1", np.array([1]))
    zero, one = const("zero", np.zeros((), np.float32)), const("one", np.ones((), np.float32))
    tiny, ninf = const("tiny", np.full((), 1e-6, np.float32)), const("ninf", np.full((), -np.inf, np.float32))
    close_id = const("close_id", np.array(close, np.int64))
    logits = "logits" if np.dtype(logits_dtype) == np.float32 else node("Cast", ["logits"], "logits32",
                                                                        to=TensorProto.FLOAT)
    temperature, top_p = column("params", 0, "temperature"), column("params", 1, "top_p")
    frequency, presence = column("params", 2, "frequency"), column("params", 3, "presence")
    thinking, left = column("state", 0, "thinking"), column("state", 1, "left")
    # the penalties and the bias, over the whole vocabulary; </think> barred outside a thinking span
    seen = node("Cast", [node("Greater", ["counts", zero], "seen_bool")], "seen", to=TensorProto.FLOAT)
    x = node("Sub", [node("Add", [logits, "bias"], "biased"),
                     node("Add", [node("Mul", ["counts", frequency], "by_count"),
                                  node("Mul", [seen, presence], "by_presence")], "penalty")], "penalized")
    close_column = np.zeros((1, vocab), np.float32)
    close_column[0, close] = 1.0
    not_thinking = node("Sub", [one, thinking], "not_thinking")
    closed = node("Mul", [const("close_column", close_column), not_thinking], "close_barred")
    barred = node("Greater", [closed, zero], "barred")
    x = node("Where", [barred, ninf, x], "allowed")
    # a greedy row takes the largest; a sampled row draws among the k largest at its temperature (TopK over the
    # scaled logits: their order is the logits' for any temperature > 0), against the whole vocabulary's softmax
    # (its log-sum-exp), the nucleus by the mass before each, Gumbel-max over the kept. TensorRT 8.5 without NVRTC
    # (the harness) aborts on a fused Div-Sub-Exp over the TopK's values: so the k's probabilities are Exp(Sub)
    # of values already scaled
    group = groups_of(vocab, k) if split else 1
    groups = vocab // group
    last = const("last", np.array([-1], np.int64))
    kk = const("k", np.array([k], np.int64))
    by_group = const("by_group", np.array([-1, groups, group], np.int64)) if group > 1 else ""

    def over_ids(op: str, source: str, name: str) -> str:
        """``op`` (ReduceMax or ReduceSum) over each row's ids, kept as (rows, 1): in one pass, or per group of ids
        and then over the groups (:func:`groups_of`)."""
        def reduce(inp: str, out: str, keepdims: int) -> str:
            if op == "ReduceSum":  # its axes an input since opset 13; ReduceMax's an attribute until opset 18
                return node(op, [inp, last], out, keepdims=keepdims)
            return node(op, [inp], out, axes=[-1], keepdims=keepdims)
        if group == 1:
            return reduce(source, name, 1)
        return reduce(reduce(node("Reshape", [source, by_group], f"{name}_groups"), f"{name}_per_group", 0), name, 1)

    if group > 1:
        # the greedy row's id: the first largest (the lowest id among equal values, as ArgMax and the host's argmax):
        # the first largest of each group, then the first group whose largest is the largest
        x_groups = node("Reshape", [x, by_group], "x_groups")
        local = node("Reshape", [node("ArgMax", [x_groups], "local_first", axis=-1, keepdims=1),
                                 const("flat_groups", np.array([-1, groups], np.int64))], "local_flat")
        best = node("ArgMax", [node("ReduceMax", [x_groups], "group_maxima", axes=[-1], keepdims=0)], "best_group",
                    axis=-1, keepdims=1)
        first = node("Add", [node("Mul", [best, const("group", np.array(group, np.int64))], "group_start"),
                             node("GatherElements", [local, best], "within", axis=1)], "first")
    else:
        first = node("ArgMax", [x], "first", axis=-1, keepdims=1)
    hot = node("Greater", [temperature, zero], "hot")
    temperature = node("Max", [temperature, tiny], "safe_temperature")
    everything = node("Div", [x, temperature], "scaled_all")
    peak = over_ids("ReduceMax", everything, "peak")
    total = over_ids("ReduceSum", node("Exp", [node("Sub", [everything, peak], "shifted")], "exp_all"), "total")
    lse = node("Add", [node("Log", [total], "log_total"), peak], "lse")
    values, indices = "top_values", "top_indices"
    if group > 1:  # each group's k largest, then the k largest of those, their ids offset by their group's start
        nodes.append(helper.make_node("TopK", [node("Reshape", [everything, by_group], "scaled_groups"), kk],
                                      ["group_values", "group_indices"], name="topk_per_group", axis=-1, largest=1,
                                      sorted=1))
        offsets = const("group_offsets", (np.arange(groups, dtype=np.int64) * group)[None, :, None])
        flat_k = const("flat_k", np.array([-1, groups * k], np.int64))
        candidates = node("Reshape", [node("Add", ["group_indices", offsets], "group_ids"), flat_k], "candidate_ids")
        nodes.append(helper.make_node("TopK", [node("Reshape", ["group_values", flat_k], "candidates"), kk],
                                      [values, "top_positions"], name="topk", axis=-1, largest=1, sorted=1))
        indices = node("GatherElements", [candidates, "top_positions"], indices, axis=1)
    else:
        nodes.append(helper.make_node("TopK", [everything, kk], [values, indices], name="topk", axis=-1, largest=1,
                                      sorted=1))
    probs = node("Exp", [node("Sub", [values, lse], "log_probs")], "probs")
    before = node("MatMul", [probs, const("upper", np.triu(np.ones((k, k), np.float32), 1))], "mass_before")
    keep = node("Less", [before, top_p], "keep")
    scores = node("Where", [keep, node("Add", [values, "noise"], "perturbed"), ninf], "scores")
    drawn = node("ArgMax", [scores], "drawn", axis=-1, keepdims=1)
    chosen = node("Where", [hot, node("GatherElements", [indices, drawn], "sampled", axis=1), first], "chosen")
    # a thinking row out of budget closes its span
    thinking_now = node("Greater", [thinking, zero], "thinking_now")
    forced = node("And", [thinking_now, node("Not", [node("Greater", [left, zero], "budget_left")], "spent")],
                  "forced")
    ids = node("Where", [forced, close_id, chosen], "ids")
    # the state after the id
    still = node("Cast", [node("And", [thinking_now, node("Not", [node("Equal", [ids, close_id], "closes")],
                                                           "open")], "still_bool")], "still", to=TensorProto.FLOAT)
    node("Concat", [still, node("Sub", [left, still], "left_out")], "state_out", axis=1)
    onehot = node("Cast", [node("Equal", [const("vocab_ids", np.arange(vocab, dtype=np.int64)[None]), ids], "is_id")],
                  "onehot", to=TensorProto.FLOAT)
    node("Add", ["counts", onehot], "counts_out")
    elem = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}
    widths = {"vocab": vocab, "k": k}
    inputs = [helper.make_tensor_value_info(name, elem[np.dtype(logits_dtype)] if name == "logits"
                                            else TensorProto.FLOAT, [shape[0], widths.get(shape[1], shape[1])])
              for name, shape in INPUTS]
    outputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["rows", 1]),
               helper.make_tensor_value_info("counts_out", TensorProto.FLOAT, ["rows", vocab]),
               helper.make_tensor_value_info("state_out", TensorProto.FLOAT, ["rows", 2])]
    graph = helper.make_graph(nodes, "select", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="autoglm-build")
    model.ir_version = min(model.ir_version, 8)  # what ONNX Runtime and TensorRT 8.5's parser read
    onnx.checker.check_model(model)
    return model


def gumbel(rng: np.random.Generator, rows: int, k: int) -> np.ndarray:
    """(rows, k) Gumbel noise, ``-log(-log(u))``, from ``rng`` (a request's own generator, a row at a time)."""
    u = rng.random((rows, k))
    return (-np.log(-np.log(np.clip(u, 1e-20, 1.0 - 1e-7)))).astype(np.float32)
