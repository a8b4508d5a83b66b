"""The select graph (runtime/select.py), run by ONNX Runtime: greedy rows pick what the host sampler picks, sampled
rows draw from their top-p nucleus (measured over the whole vocabulary, cut to the top k) at its probabilities,
rows are independent, and the graph has no loop and no random op (what TensorRT 8.5's parser cannot build or seed)."""

from __future__ import annotations

import numpy as np
import pytest

from autoglm_build.runtime.select import MAX_K, OPS, gumbel, select_graph


def _session(k: int, vocab: int, close: int = 0):
    import onnxruntime as ort

    return ort.InferenceSession(select_graph(k, vocab, close).SerializeToString(), providers=["CPUExecutionProvider"])


def _run(logits, k, close=0, **kw):
    """The graph's three outputs for ``_feed(logits, **kw)``."""
    return _session(k, logits.shape[1], close).run(None, _feed(logits, k=k, **kw))


def _feed(logits, bias=None, counts=None, frequency=0.0, presence=0.0, temperature=0.0, top_p=1.0, noise=None, k=8,
          thinking=1.0, left=1e9):
    """Defaults: no bias, no counts, greedy, and a thinking row with budget to spare (so nothing bars </think>)."""
    rows, vocab = logits.shape
    column = lambda v: np.full((rows, 1), v, np.float32) if np.isscalar(v) else np.asarray(v, np.float32)[:, None]  # noqa: E731
    return {"logits": logits.astype(np.float32),
            "bias": np.zeros((rows, vocab), np.float32) if bias is None else bias.astype(np.float32),
            "counts": np.zeros((rows, vocab), np.float32) if counts is None else counts.astype(np.float32),
            "params": np.concatenate([column(temperature), column(top_p), column(frequency), column(presence)], axis=1),
            "state": np.concatenate([column(thinking), column(left)], axis=1),
            "noise": np.zeros((rows, k), np.float32) if noise is None else noise}


def test_greedy_rows_take_the_largest_penalized_allowed_logit():
    """Every row's unpenalized winner has counts, so the penalties decide: frequency-only rows, presence-only rows
    and rows with both; some winners must change. Barred ids (bias -inf) never win. Temperature 0 takes the top
    id whatever the noise says (noise here favours the second)."""
    rng = np.random.default_rng(0)
    rows, vocab, k = 24, 300, 8
    logits = rng.standard_normal((rows, vocab)).astype(np.float32)
    bias = np.where(rng.random((rows, vocab)) < 0.2, -np.inf, 0.0)  # ids some rows may not produce
    plain = np.argmax(logits + bias, axis=1)
    counts = np.zeros((rows, vocab), np.float32)
    counts[np.arange(rows), plain] = rng.integers(1, 4, rows)  # each row generated its winner before
    frequency = np.where(np.arange(rows) % 3 == 1, 0.0, rng.random(rows) * 1.5)  # every third: presence only
    presence = np.where(np.arange(rows) % 3 == 0, 0.0, rng.random(rows) * 1.5)  # every third: frequency only
    noise = np.zeros((rows, k), np.float32)
    noise[:, 1] = 100.0  # a sampled row would take the second
    got = _run(logits, k, bias=bias, counts=counts, frequency=frequency, presence=presence, temperature=0.0,
               noise=noise)[0][:, 0]
    want = np.argmax(logits + bias - counts * frequency[:, None] - (counts > 0) * presence[:, None], axis=1)
    np.testing.assert_array_equal(got, want)
    assert (want != plain).sum() >= rows // 4  # the penalties moved winners, in each kind of row
    for kind in (0, 1, 2):
        assert (want != plain)[np.arange(rows) % 3 == kind].any(), kind
    assert np.isfinite(bias[np.arange(rows), got]).all()
    # a near-tie (one float32 step apart): at temperature 0 the top, though the noise favours the second (a graph
    # that sampled its greedy rows at a tiny temperature would take the second here)
    tie = np.array([[0.5, np.nextafter(np.float32(0.5), np.float32(1)), -1.0, -2.0]], np.float32)
    noise = np.array([[0.0, 0.0, 0.0, 0.0]], np.float32)
    noise[0, 1] = 100.0
    assert _run(tie, 4, temperature=0.0, noise=noise)[0][0, 0] == 1
    assert _run(tie, 4, temperature=1.0, noise=noise)[0][0, 0] == 0  # sampled: the noise


def test_sampled_rows_draw_from_the_top_p_nucleus_at_its_probabilities():
    """20,000 rows of the same logits, each with its own noise: the ids drawn are the nucleus's, at its
    renormalized probabilities (within 1.5 points each). The nucleus is measured as the host sampler's is, against
    the whole vocabulary's softmax at the row's temperature: here the 16 most probable of 200 ids hold less than
    half the mass, so a nucleus measured within them would keep far fewer ids."""
    k, rows, vocab, temperature, top_p = 16, 20_000, 200, 0.5, 0.3
    logits = np.tile(np.linspace(2.0, -2.0, vocab, dtype=np.float32), (rows, 1))
    noise = gumbel(np.random.default_rng(1), rows, k)
    got = _run(logits, k, temperature=temperature, top_p=top_p, noise=noise)[0][:, 0]
    weights = np.exp(logits[0].astype(np.float64) / temperature)
    probs = weights / weights.sum()  # sorted already: the logits fall
    assert probs[:k].sum() < 0.5
    keep = ((np.cumsum(probs) - probs) < top_p)[:k]
    assert 4 < keep.sum() < k  # the nucleus fits the k, and is more than the top few
    want = np.where(keep, probs[:k], 0.0) / probs[:k][keep].sum()
    seen = np.bincount(got, minlength=vocab) / rows
    assert set(np.flatnonzero(seen)) <= set(np.flatnonzero(keep))
    np.testing.assert_allclose(seen[:k], want, atol=0.015)


def test_rows_are_independent_and_seeded_noise_repeats_its_tokens():
    rng = np.random.default_rng(2)
    k, rows = 8, 6
    logits = rng.standard_normal((rows, 50)).astype(np.float32)
    temperature = np.array([0.0, 0.7, 1.0, 0.0, 1.3, 0.5], np.float32)
    noise = np.concatenate([gumbel(np.random.default_rng(seed), 1, k) for seed in range(rows)])
    session = _session(k, logits.shape[1])
    batch = session.run(None, _feed(logits, temperature=temperature, noise=noise, k=k))[0][:, 0]
    alone = [session.run(None, _feed(logits[r:r + 1], temperature=temperature[r:r + 1], noise=noise[r:r + 1], k=k))
             [0][0, 0] for r in range(rows)]
    np.testing.assert_array_equal(batch, alone)
    again = np.concatenate([gumbel(np.random.default_rng(seed), 1, k) for seed in range(rows)])
    np.testing.assert_array_equal(noise, again)


def test_the_graph_has_no_loop_nor_random_op_and_keeps_tensorrts_topk_limit():
    model = select_graph(MAX_K, vocab=5000, close=7)
    assert {n.op_type for n in model.graph.node} <= OPS
    assert not {"CumSum", "RandomUniform", "RandomUniformLike", "Loop"} & {n.op_type for n in model.graph.node}
    with pytest.raises(ValueError, match="k 3841 is outside 1..3840"):
        select_graph(MAX_K + 1, vocab=5000, close=7)


def test_the_rows_state_moves_with_its_ids_as_the_host_advances_it():
    """</think> (id 2, the top logit of every row) is barred outside a thinking span; a thinking row that has spent
    its budget takes it whatever the logits say; the counts gain the id chosen; the state after: still thinking
    unless it closed, one reasoning token fewer left while thinking."""
    logits = np.tile(np.array([[0.0, 1.0, 5.0, 3.0, -1.0, 0.5]], np.float32), (4, 1))
    logits[3] = [0.0, 9.0, -5.0, 3.0, -1.0, 0.5]  # </think> least likely: the spent budget forces it anyway
    counts = np.zeros_like(logits)
    counts[:, 4] = [0, 1, 2, 3]
    thinking = np.array([0.0, 1.0, 1.0, 1.0])
    left = np.array([0.0, 4.0, 1.0, 0.0])
    ids, counts_out, state_out = _run(logits, 3, close=2, counts=counts, thinking=thinking, left=left)
    # row 0 is not thinking: not </think>, the next best; rows 1 and 2 may close; row 3 must
    np.testing.assert_array_equal(ids[:, 0], [3, 2, 2, 2])
    want = counts.copy()
    want[np.arange(4), ids[:, 0]] += 1
    np.testing.assert_array_equal(counts_out, want)
    np.testing.assert_array_equal(state_out, [[0, 0], [0, 4], [0, 1], [0, 0]])
    # a thinking row that does not close stays in its span and spends a token of its budget
    logits[1] = [0.0, 9.0, -5.0, 3.0, -1.0, 0.5]
    ids, _, state_out = _run(logits[1:2], 3, close=2, thinking=1.0, left=4.0)
    assert ids[0, 0] == 1
    np.testing.assert_array_equal(state_out, [[1, 3]])


def test_the_device_tables_and_the_graph_pick_what_the_host_sampler_and_scheduler_do():
    """``Sampler.device_row`` (a row's tables as the host sees them) and the graph's own moves of the counts and the
    state, step after step, against ``Sampler.pick`` and ``Scheduler._advance`` on the same logits (greedy rows:
    the draw aside, the rules are the same): rows in and out of a thinking span, with a budget that forces
    ``</think>``, the default budget (half of ``max_tokens``), ``ignore_eos``, frequency and presence penalties. The
    logits favour ``</think>`` and the stop ids now and then, so the rules decide. After every step the graph's
    counts and state equal the host's account of the row (``device_row`` again)."""
    from types import SimpleNamespace

    from autoglm_build.calibration import tokenizer_for
    from autoglm_build.config import load_config
    from autoglm_build.runtime.generation import Request, Sampler, SamplingParams, Scheduler, _Row
    from autoglm_build.runtime.text import ChatTokenizer, Segment
    from tests.conftest import TINY

    cfg = load_config(TINY)
    tok = ChatTokenizer(tokenizer_for(cfg)[0], cfg.text.vocab_size)
    vocab, close, stops = cfg.text.vocab_size, tok.ids["</think>"], sorted(tok.stop_ids)
    specs = [(False, dict(max_tokens=40)), (True, dict(frequency_penalty=0.5, thinking_budget=3, max_tokens=40)),
             (True, dict(presence_penalty=1.0, ignore_eos=True, max_tokens=12)),
             (False, dict(frequency_penalty=0.7, presence_penalty=0.4, ignore_eos=True, max_tokens=40)),
             (True, dict(thinking_budget=0, max_tokens=40)), (True, dict(frequency_penalty=2.0, max_tokens=60))]
    sampler = Sampler(tok, len(specs))
    rows = []
    for slot, (thinking, params) in enumerate(specs):
        req = Request(tok.chat_prompt([("user", [Segment(text="打开设置")])], thinking),
                      SamplingParams(temperature=0.0, **params), emit=lambda e: None)
        req.thinking = thinking
        rows.append(_Row(req, tok, slot))
        sampler.join(slot)
    scheduler = SimpleNamespace(tokenizer=tok, sampler=sampler, tokens=0)
    tables = [np.stack(t) for t in zip(*(sampler.device_row(r, vocab) for r in rows))]
    bias, counts, params, state = tables
    session = _session(4, vocab, close)
    rng = np.random.default_rng(5)
    live, closed, stopped = list(range(len(rows))), 0, 0
    for step in range(30):
        logits = rng.standard_normal((len(rows), vocab)).astype(np.float32)
        logits[:, rng.integers(0, vocab, 50)] += 3.0  # favourites, generated again and again: the penalties bite
        if step % 4 == 1:
            logits[:, close] += 8.0
        if step % 7 == 3:
            logits[:, stops] += 8.0
        ids, counts, state = session.run(None, {"logits": logits, "bias": bias, "counts": counts, "params": params,
                                                "state": state, "noise": np.zeros((len(rows), 4), np.float32)})
        want = sampler.pick(logits[live], [rows[k] for k in live])
        assert [int(ids[k, 0]) for k in live] == want, step
        for k, token in zip(list(live), want):
            Scheduler._advance(scheduler, rows[k], token)
            closed += token == close
            if rows[k].finish is not None:
                stopped += rows[k].finish == "stop"
                live.remove(k)
                continue
            mirror = sampler.device_row(rows[k], vocab)
            np.testing.assert_array_equal(counts[k], mirror[1])
            np.testing.assert_array_equal(state[k], mirror[3])
    assert closed >= 4 and stopped >= 1 and live  # the rules were exercised, and some rows ran to the end
    assert rows[4].req.token_ids[0] == close  # a spent budget closes the span at once


@pytest.mark.parametrize("k, logits_dtype", [(64, np.float32), (8, np.float16)])
def test_a_wide_vocabulary_in_groups_picks_what_one_pass_picks(k, logits_dtype):
    """Over a vocabulary wide enough to be cut into groups (``groups_of``), the grouped passes (TopK, the greedy
    id, the log-sum-exp) give the ids, counts and state of one pass each: greedy and sampled rows, barred ids,
    penalties, a forced ``</think>``, and exact ties at the top (the lowest id, as ``ArgMax``)."""
    import onnxruntime as ort

    from autoglm_build.runtime.select import groups_of

    vocab = 6 * 2048
    assert groups_of(vocab, k) == 2048 and groups_of(4096, k) == 1 and groups_of(151552, 64) == 2048
    graphs = [select_graph(k, vocab, 5, logits_dtype, split=split) for split in (False, True)]
    assert "Reshape" not in {n.op_type for n in graphs[0].graph.node} and \
        {n.op_type for n in graphs[1].graph.node} <= OPS
    sessions = [ort.InferenceSession(g.SerializeToString(), providers=["CPUExecutionProvider"]) for g in graphs]
    rng = np.random.default_rng(0)
    rows = 8
    for trial in range(6):
        logits = (3 * rng.standard_normal((rows, vocab))).astype(logits_dtype)
        if trial % 2 == 0:
            logits[:, 4090:4100] = logits.max() + 1  # equal largest logits across a group's edge (4,096)
        feed = {"logits": logits,
                "bias": np.where(rng.random((rows, vocab)) < 0.1, -np.inf, 0.0).astype(np.float32),
                "counts": 2 * (rng.random((rows, vocab)) < 0.01).astype(np.float32),
                "params": np.stack([np.where(np.arange(rows) % 2 == 0, 0.0, 0.7), np.full(rows, 0.9),
                                    np.full(rows, 0.3), np.full(rows, 0.2)], 1).astype(np.float32),
                "state": np.stack([np.arange(rows) % 3 == 0, np.where(np.arange(rows) == 3, 0, 5)], 1)
                .astype(np.float32),
                "noise": gumbel(rng, rows, k)}
        feed["bias"][:, 4090:4100] = 0.0
        one, grouped = (s.run(None, feed) for s in sessions)
        for a, b in zip(one, grouped):
            np.testing.assert_array_equal(a, b)
        greedy = one[0][::2, 0]
        assert (greedy[[0, 2]] == 4090).all() if trial % 2 == 0 else True  # the first of the tied ids


def test_a_requests_noise_drawn_in_blocks_is_the_noise_drawn_a_step_at_a_time_and_rewinds_exactly():
    """GumbelNoise (the select engine's noise, 32 steps per draw) hands out what one draw a step gave, bit for bit;
    a rewind (a failed step run again) gives the same numbers again, across a block's edge too, and the generator
    ends where it would have."""
    from autoglm_build.runtime.device_select import GumbelNoise

    k, steps = 8, 2 * GumbelNoise.BLOCK + 5
    one = np.random.default_rng(7)
    expected = [gumbel(one, 1, k)[0] for _ in range(steps)]
    stream = GumbelNoise(np.random.default_rng(7), k)
    taken = []
    for step in range(steps):
        mark = stream.mark()
        first = stream.take().copy()
        if step in (0, 5, GumbelNoise.BLOCK - 1, GumbelNoise.BLOCK, 2 * GumbelNoise.BLOCK):  # run again
            stream.rewind(mark)
            assert np.array_equal(stream.take(), first)
        taken.append(first)
    assert all(np.array_equal(a, b) for a, b in zip(taken, expected))
    # two steps taken, then both taken back (a step launched ahead and the one before it): from a block's last row
    stream, one = GumbelNoise(np.random.default_rng(3), k), np.random.default_rng(3)
    for _ in range(GumbelNoise.BLOCK - 1):
        stream.take()
    mark = stream.mark()
    ahead = [stream.take().copy() for _ in range(3)]  # the block's last row, then a new block's first two
    stream.rewind(mark)
    assert all(np.array_equal(stream.take(), a) for a in ahead)
    reference = gumbel(one, GumbelNoise.BLOCK + 2, k)
    assert np.array_equal(ahead, reference[-3:])
    drawn = np.random.default_rng(3)
    drawn.random((2 * GumbelNoise.BLOCK, k))  # the two blocks, each drawn once: the rewind drew none again
    assert stream.rng.bit_generator.state == drawn.bit_generator.state
