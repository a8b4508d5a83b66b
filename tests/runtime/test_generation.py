"""Batched generation over the tiny build's ONNX graphs (ONNX Runtime)."""

from __future__ import annotations

import numpy as np
import pytest

from autoglm_build.runtime.generation import QueueFull, Request, SamplingParams, Scheduler
from autoglm_build.runtime.text import Segment


def _generate(runtime, prompts, max_batch=8, **params):
    """Submit every prompt, run to completion; (text by index, done events)."""
    cfg, backend, tok = runtime
    scheduler = Scheduler(backend, cfg, tok, max_batch=max_batch, queue_size=64, context=cfg.engine.context)
    events = {}
    for i, (text, thinking) in enumerate(prompts):
        prompt = tok.chat_prompt([("user", [Segment(text=text)])], thinking)
        scheduler.submit(Request(prompt, SamplingParams(**params),
                                 emit=lambda e, i=i: events.setdefault(i, []).append(e)))
    scheduler.run_until_idle()
    out = {}
    for i, evs in events.items():
        content = "".join(e["content"] for e in evs if e["type"] == "delta")
        reasoning = "".join(e["reasoning"] for e in evs if e["type"] == "delta")
        out[i] = (reasoning, content, evs[-1])
    return out, scheduler


PROMPTS = [("打开微信", False), ("Open the settings app and turn on dark mode " * 3, False), ("你是谁?", False),
           ("Book a table for two at 7pm", False), ("在小红书上搜索成都旅游攻略" * 4, False)]


def test_batched_rows_generate_what_each_generates_alone(runtime):
    """Left padding, cache joins and row removal change nothing a row computes (greedy)."""
    alone = {i: _generate(runtime, [p], temperature=0, max_tokens=24)[0][0] for i, p in enumerate(PROMPTS)}
    batched, _ = _generate(runtime, PROMPTS, temperature=0, max_tokens=24, max_batch=8)
    for i in range(len(PROMPTS)):
        assert batched[i][2]["type"] == "done"
        assert batched[i][:2] == alone[i][:2]


def test_continuous_batching_admits_new_rows_into_a_running_batch(runtime):
    """max_batch 2 with 5 requests: rows leave and new ones join mid-flight; results equal solo runs."""
    solo = {i: _generate(runtime, [p], temperature=0, max_tokens=16)[0][0][1] for i, p in enumerate(PROMPTS)}
    joined, scheduler = _generate(runtime, PROMPTS, temperature=0, max_tokens=16, max_batch=2)
    assert {i: joined[i][1] for i in joined} == solo
    assert scheduler.stats()["active"] == 0


def test_seeded_sampling_is_reproducible_and_seed_dependent(runtime):
    a = _generate(runtime, [PROMPTS[0]], temperature=0.8, top_p=0.9, seed=3, max_tokens=32)[0][0][1]
    b = _generate(runtime, [PROMPTS[0]], temperature=0.8, top_p=0.9, seed=3, max_tokens=32)[0][0][1]
    c = _generate(runtime, [PROMPTS[0]], temperature=0.8, top_p=0.9, seed=4, max_tokens=32)[0][0][1]
    assert a == b and a != c


def test_thinking_budget_closes_the_span_and_an_answer_follows(runtime):
    out, _ = _generate(runtime, [("你是谁?", True)], temperature=0.7, seed=1, max_tokens=40, thinking_budget=10)
    reasoning, content, done = out[0]
    assert done["usage"]["completion_tokens_details"]["reasoning_tokens"] <= 10
    assert reasoning and content
    assert "<think>" not in content and "</think>" not in content


def test_usage_counts_and_length_finish(runtime):
    out, scheduler = _generate(runtime, [PROMPTS[2]], temperature=0, max_tokens=7, ignore_eos=True)
    done = out[0][2]
    assert done == {"type": "done", "finish_reason": "length", "usage": done["usage"]}
    assert done["usage"]["completion_tokens"] == 7
    assert scheduler.tokens == 7 and scheduler.steps == 6  # the first token comes from the prefill


def test_the_tick_hook_runs_once_per_step_before_the_step_s_engine_calls(runtime, caplog):
    """``Scheduler.tick`` (the server's paced stream flushes) runs at the start of every step, before its prefill
    or decode; a scheduler without one runs as before."""
    cfg, backend, tok = runtime
    scheduler = Scheduler(backend, cfg, tok, max_batch=4, queue_size=8, context=cfg.engine.context)
    calls = []
    scheduler.tick = lambda: calls.append("tick")
    for name in ("_prefill", "_decode"):
        work = getattr(scheduler, name)
        setattr(scheduler, name, lambda *a, work=work, name=name: (calls.append(name), work(*a))[1])
    prompt = tok.text_prompt("hi")
    for _ in range(3):
        scheduler.submit(Request(prompt, SamplingParams(max_tokens=5, ignore_eos=True), emit=lambda e: None))
    scheduler.run_until_idle()
    assert calls[0] == "tick" and calls.count("_prefill") == 1 and calls.count("_decode") == scheduler.steps == 4
    assert all(calls[k - 1] == "tick" for k, call in enumerate(calls) if call != "tick"), calls
    assert calls.count("tick") == len(calls) - calls.count("tick")  # one per step: each ran a prefill or a decode

    def broken():
        raise RuntimeError("tick")

    again = Scheduler(backend, cfg, tok, max_batch=4, queue_size=8, context=cfg.engine.context)
    again.tick = broken  # a hook that raises: said once, and the steps run on
    events = []
    again.submit(Request(prompt, SamplingParams(max_tokens=5, ignore_eos=True), emit=events.append))
    again.run_until_idle()
    assert events[-1]["type"] == "done" and again.tick_failures == again.steps + 1 == 5
    assert sum("tick hook raised" in r.getMessage() for r in caplog.records) == 1


def test_queue_bound(runtime):
    cfg, backend, tok = runtime
    scheduler = Scheduler(backend, cfg, tok, max_batch=1, queue_size=1, context=cfg.engine.context)
    prompt = tok.text_prompt("hi")
    scheduler.submit(Request(prompt, SamplingParams(max_tokens=2), emit=lambda e: None))  # takes the free row
    scheduler.submit(Request(prompt, SamplingParams(max_tokens=2), emit=lambda e: None))  # waits
    with pytest.raises(QueueFull):
        scheduler.submit(Request(prompt, SamplingParams(max_tokens=2), emit=lambda e: None))


def test_image_positions_follow_glm4v_rope_index(runtime):
    """An image's embeddings get (t, row, col) positions; the text after continues at max + 1."""
    cfg, backend, tok = runtime
    embeds = np.zeros((16, cfg.text.hidden_size), np.float32)
    prompt = tok.build([Segment(text="a"), Segment(media="image", embeds=embeds, grid=(4, 4)), Segment(text="b")])
    start = prompt.splices[0][0]
    pos = prompt.positions[:, start:start + 16]
    assert (pos[0] == start).all()
    assert pos[1].tolist() == [start + r for r in range(4) for _ in range(4)]
    assert pos[2].tolist() == [start + c for _ in range(4) for c in range(4)]
    assert prompt.positions[0, start + 16] == start + 4  # <|end_of_image|> after max(rows, cols)
    assert prompt.media_tokens == {"image": 16, "audio": 0}


def test_a_failing_backend_ends_every_affected_request_with_an_error(runtime):
    """A prefill that fails reaches the requests it admitted (they are in no batch row yet)."""
    cfg, backend, tok = runtime

    class Broken:
        max_batch = context = None

        def run(self, module, feed, phase="prefill"):
            raise RuntimeError("device lost")

    scheduler = Scheduler(Broken(), cfg, tok, max_batch=4, queue_size=4, context=cfg.engine.context)
    events = []
    for _ in range(2):
        scheduler.submit(Request(tok.text_prompt("hi"), SamplingParams(max_tokens=3), emit=events.append))
    scheduler.run_until_idle()
    assert [e["type"] for e in events] == ["error", "error"]
    assert "device lost" in events[0]["message"]


# ---- the request contract: penalties, long prompts -----------------------------------------------


def _reference_penalties(logits, generated, frequency, presence):
    """OpenAI's definition, written out plainly."""
    out = [float(x) for x in logits]
    for token in set(generated):
        count = sum(1 for g in generated if g == token)
        out[token] -= count * frequency + (presence if count > 0 else 0.0)
    return np.array(out)


@pytest.mark.parametrize("frequency, presence", [(0.0, 0.0), (2.0, 0.0), (0.0, 1.5), (0.2, -0.5), (-2.0, 2.0)])
def test_penalties_equal_a_plain_reference(frequency, presence):
    from autoglm_build.runtime.generation import apply_penalties

    rng = np.random.default_rng(0)
    logits = rng.standard_normal(50)
    generated = list(rng.integers(0, 50, 30)) + [7, 7, 7]
    np.testing.assert_allclose(apply_penalties(logits, generated, frequency, presence),
                               _reference_penalties(logits, generated, frequency, presence))
    np.testing.assert_array_equal(apply_penalties(logits, [], frequency, presence), logits)


@pytest.mark.parametrize("head", [2, 8, 64])
def test_nucleus_from_the_head_keeps_the_ids_of_a_full_sort(head):
    """The partial sort keeps exactly the full sort's ids: cuts inside and beyond the head, ties at the cut
    (left to the full sort), probabilities piled on one id, top_p at and above the total mass."""
    from autoglm_build.runtime.generation import _nucleus, _nucleus_sorted

    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.full(300, 0.3), size=24)
    probs[3:6, :40] = 0.01  # forty equal ids: cuts among ties
    probs[6] = 0.0
    probs[6, 17] = 1.0
    probs /= probs.sum(axis=1, keepdims=True)
    for top_p in (0.01, 0.3, 0.395, 0.4, 0.9, 0.999, 1.0, 1.5):
        p = np.full(len(probs), top_p)
        np.testing.assert_array_equal(_nucleus(probs, p, head), _nucleus_sorted(probs, p))


def test_frequency_penalty_changes_greedy_output(runtime):
    prompt = [("Open the settings app and turn on dark mode", False)]
    plain = _generate(runtime, prompt, temperature=0, max_tokens=40, ignore_eos=True)[0][0][1]
    penalised = _generate(runtime, prompt, temperature=0, max_tokens=40, ignore_eos=True,
                          frequency_penalty=2.0)[0][0][1]
    assert plain != penalised


def test_a_long_prompt_is_prefilled_in_chunks_equal_to_one_call(runtime):
    """>= 8,000 prompt tokens: four 2,048-token chunks (each attending to the cache the earlier ones wrote)
    generate what one 8,192-token call generates."""
    cfg, backend, tok = runtime
    text = "在小红书上搜索成都旅游攻略, then open the settings app and turn on dark mode. " * 480
    prompt = tok.chat_prompt([("user", [Segment(text=text)])], False)
    prompt.ids, prompt.positions = prompt.ids[-8050:], prompt.positions[:, -8050:] - prompt.positions[0, -8050]
    assert len(prompt.ids) >= 8000

    def run(chunk):
        scheduler = Scheduler(backend, cfg, tok, max_batch=1, queue_size=1, context=cfg.engine.context,
                              prefill_chunk=chunk)
        events = []
        req = Request(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), emit=events.append)
        scheduler.submit(req)
        scheduler.run_until_idle()
        assert events[-1]["type"] == "done" and events[-1]["usage"]["prompt_tokens"] == len(prompt.ids)
        return req.token_ids, scheduler

    chunked, s_chunked = run(2048)
    whole, s_whole = run(8192)
    assert s_chunked.prefill_chunk == 2048 and s_whole.prefill_chunk == 8192
    assert s_chunked.prefill_tokens == s_whole.prefill_tokens == len(prompt.ids)
    assert len(chunked) == 8 and chunked == whole


def test_prefill_batch_splits_admitted_requests_into_groups(runtime):
    """A prefill profile of fewer rows than the decode one (engine.prefill_batch, a long-context engine):
    five requests admitted together are prefilled two, two and one at a time, then decode as one batch,
    generating what each generates alone."""
    cfg, backend, tok = runtime
    solo = {i: _generate(runtime, [p], temperature=0, max_tokens=12)[0][0][1] for i, p in enumerate(PROMPTS)}
    scheduler = Scheduler(backend, cfg, tok, max_batch=8, queue_size=64, context=cfg.engine.context, prefill_batch=2)
    calls = []
    prefill = scheduler.cache.prefill

    def counted(slots, *args, **kwargs):
        calls.append(len(slots))
        return prefill(slots, *args, **kwargs)

    scheduler.cache.prefill = counted
    events = {}
    for i, (text, thinking) in enumerate(PROMPTS):
        prompt = tok.chat_prompt([("user", [Segment(text=text)])], thinking)
        scheduler.submit(Request(prompt, SamplingParams(temperature=0, max_tokens=12),
                                 emit=lambda e, i=i: events.setdefault(i, []).append(e)))
    scheduler.run_until_idle()
    assert calls == [2, 2, 1] and scheduler.stats()["prefill_batch"] == 2
    for i in range(len(PROMPTS)):
        assert "".join(e["content"] for e in events[i] if e["type"] == "delta") == solo[i]


# ---- one row's failure is that row's (issue 16, item 3) ------------------------------------------


class _PoisonedDecoder:
    """The tiny build's backend, except that a decode step raises while some row is at ``position``:
    a backend error caused by one row (as a bad input of one request would be)."""

    max_batch = context = None

    def __init__(self, inner, position: int) -> None:
        self.inner, self.position = inner, position

    def run(self, module, feed, phase="prefill"):
        if module == "decoder" and phase == "decode" and (feed["position_ids"] == self.position).any():
            raise RuntimeError("row poisoned")
        return self.inner.run(module, feed, phase)


def _run_requests(runtime, backend, specs):
    """Submit ``(text, params, emit_wrapper)`` requests together; events per index."""
    cfg, _, tok = runtime
    scheduler = Scheduler(backend, cfg, tok, max_batch=8, queue_size=8, context=cfg.engine.context)
    events = {i: [] for i in range(len(specs))}
    for i, (text, params, wrap) in enumerate(specs):
        emit = events[i].append
        prompt = tok.chat_prompt([("user", [Segment(text=text)])], False)
        scheduler.submit(Request(prompt, params, emit=wrap(emit) if wrap else emit))
    scheduler.run_until_idle()
    return events, scheduler


def _content(evs):
    return "".join(e["content"] for e in evs if e["type"] == "delta")


def _gone_after(n):
    """An emit that raises from its n-th event on (the client's event loop is gone)."""
    def wrap(emit):
        calls = []

        def send(event):
            calls.append(event)
            if len(calls) >= n:
                raise RuntimeError("Event loop is closed")
            emit(event)
        return send
    return wrap


@pytest.mark.parametrize("failure", ["bad seed", "backend error in one row", "client gone"])
def test_a_failing_row_ends_alone_and_the_others_generate_what_they_generate_alone(runtime, failure):
    cfg, backend, tok = runtime
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    others = [PROMPTS[0][0], PROMPTS[2][0], PROMPTS[3][0]]
    alone = [_content(_run_requests(runtime, backend, [(text, greedy, None)])[0][0]) for text in others]
    bad_text, bad_params, wrap, used = PROMPTS[1][0] * 2, greedy, None, backend
    if failure == "bad seed":  # numpy refuses it when the row's generator is made
        bad_params = SamplingParams(temperature=0.7, seed=-1, max_tokens=12)
    elif failure == "backend error in one row":  # its 4th decode step raises; the others never get there
        position = tok.chat_prompt([("user", [Segment(text=bad_text)])], False).next_position + 3
        short = max(tok.chat_prompt([("user", [Segment(text=t)])], False).next_position for t in others)
        assert short + greedy.max_tokens < position
        used = _PoisonedDecoder(backend, position)
    else:
        wrap = _gone_after(3)
    events, scheduler = _run_requests(runtime, used, [(text, greedy, None) for text in others] +
                                      [(bad_text, bad_params, wrap)])
    for i in range(len(others)):
        assert events[i][-1]["type"] == "done", events[i][-1]
        assert _content(events[i]) == alone[i]
    bad = events[len(others)]
    if failure == "client gone":
        assert len(bad) == 2  # two deltas got through; the error had nobody to reach
    else:
        assert bad[-1]["type"] == "error" and [e["type"] for e in bad].count("error") == 1
        assert ("row poisoned" if failure == "backend error in one row" else "ValueError") in bad[-1]["message"]
    assert scheduler.stats()["active"] == 0 and scheduler.cache.top == 0


def test_greedy_rows_pick_what_the_full_pass_picks(runtime):
    """The greedy rows' pass over whole rows (:meth:`Sampler._greedy`) equals the full float64 pass
    (:meth:`Sampler._pick`) id for id: penalties of both kinds and signs, repeated ids, ties between a
    penalized and a plain id and between plain ids, the ``</think>`` and stop ids barred or not, float16 and
    float32 logits, and ids no row produces holding the largest logit."""
    from types import SimpleNamespace

    from autoglm_build.runtime.generation import Sampler

    _, _, tok = runtime
    sampler = Sampler(tok, slots=4)
    rng = np.random.default_rng(3)
    vocab = len(tok.allowed)
    checked = 0
    for case in range(300):
        slot = case % 4
        sampler.join(slot)
        for token in rng.choice(sampler.ids, size=int(rng.integers(0, 40))):
            sampler.count(slot, int(token))
        if case % 7 == 0:  # a generated stop / </think>: barred ids the row has counts for
            sampler.count(slot, sampler.close_id)
            sampler.count(slot, int(sampler.stop_ids[0]))
        frequency, presence = [(0.0, 0.0), (0.2, 0.0), (2.0, 1.5), (0.0, 0.7), (-0.5, 0.0), (0.3, -1.0)][case % 6]
        logits = rng.standard_normal(vocab).astype(np.float32) * 3
        if case % 5 == 0:  # quantized logits: many exact ties
            logits = np.round(logits)
        if case % 11 == 0:  # an id no row may produce holds the maximum
            logits[sampler.never[0]] = 100.0
        seen = np.flatnonzero(sampler.counts[slot])
        if case % 3 == 0 and seen.size:  # a penalized id ties the best plain one after its penalty, exactly
            frequency, presence = 0.5, 0.25  # dyadic: the penalized float64 value lands on the plain one
            logits = np.round(logits * 4) / 4
            top = sampler.ids[seen[0]]
            count = sampler.counts[slot, seen[0]]
            best = float(np.max(np.delete(logits[sampler.ids], seen)))
            logits[top] = np.float32(best + frequency * count + presence)
        if case % 4 == 1:
            logits = logits.astype(np.float16)
        params = SamplingParams(temperature=0, frequency_penalty=frequency, presence_penalty=presence,
                                ignore_eos=bool(case % 2))
        row = SimpleNamespace(slot=slot, req=SimpleNamespace(params=params, thinking=bool(case % 3 == 2)))
        full = int(sampler.ids[sampler._pick(np.take(logits[None], sampler.ids, axis=1).astype(np.float64), [row])[0]])
        assert sampler._greedy(logits, row) == full, case
        checked += 1
    assert checked == 300
    # the ids a slot generated follow it when its row moves (Scheduler._retire) and are gone when a row joins
    sampler.join(0), sampler.join(1), sampler.join(2)
    for token in sampler.ids[[5, 5, 9]]:
        sampler.count(0, int(token))
    sampler.move(0, 2)
    sampler.join(0)
    logits = rng.standard_normal(vocab).astype(np.float32)
    logits[sampler.ids[5]] = logits.max() + 0.1  # the best id, unless the moved counts penalize it
    params = SamplingParams(temperature=0, frequency_penalty=2.0)
    for slot in (0, 2):
        row = SimpleNamespace(slot=slot, req=SimpleNamespace(params=params, thinking=False))
        full = int(sampler.ids[sampler._pick(np.take(logits[None], sampler.ids, axis=1).astype(np.float64), [row])[0]])
        assert sampler._greedy(logits, row) == full
    assert sampler._greedy(logits, SimpleNamespace(slot=2, req=SimpleNamespace(params=params, thinking=False))) \
        != sampler.ids[5]  # penalized in the slot it moved to
    nan = logits.copy()
    nan[sampler.ids[[3, 7]]] = np.nan  # NaN logits: the full pass's argmax rules
    row = SimpleNamespace(slot=2, req=SimpleNamespace(params=params, thinking=False))
    assert sampler._greedy(nan, row) == int(
        sampler.ids[sampler._pick(np.take(nan[None], sampler.ids, axis=1).astype(np.float64), [row])[0]])


def _spied_sampler(tok, slots: int):
    """A sampler whose ``_draw`` keeps a copy of each batch of weights it gets: (sampler, those copies)."""
    from autoglm_build.runtime.generation import Sampler

    sampler = Sampler(tok, slots=slots)
    seen = []
    draw = sampler._draw
    sampler._draw = lambda weights, draws: (seen.append(weights.copy()), draw(weights, draws))[1]
    return sampler, seen


def _seeded_row(slot: int, params, seed: int, thinking: bool = False):
    """What ``Sampler._pick`` reads of a scheduler row: its slot and its request's parameters, thinking state,
    generator (seeded) and uniform draws from it."""
    from types import SimpleNamespace

    from autoglm_build.runtime.generation import UniformDraws

    generator = np.random.default_rng(seed)
    return SimpleNamespace(slot=slot, req=SimpleNamespace(params=params, thinking=thinking, rng=generator,
                                                          draws=UniformDraws(generator)))


def _reference_pick(sampler, logits, rows):
    """``Sampler._pick``'s arithmetic with a temporary per operation and a one-level running sum: the oracle the
    in-place pass must equal token for token. (The penalties in float64; from the temperature on, float32, the
    maximum subtracted before the division by the float32 temperature; the exp in float32; float64 sums.)"""
    from autoglm_build.runtime.generation import _nucleus

    params = [r.req.params for r in rows]
    frequency = np.array([p.frequency_penalty for p in params])
    presence = np.array([p.presence_penalty for p in params])
    if frequency.any() or presence.any():
        counts = sampler.counts[[r.slot for r in rows]]
        logits = logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)
    allowed = np.broadcast_to(sampler.allowed, logits.shape).copy()
    allowed[:, sampler.close] = [r.req.thinking for r in rows]
    no_eos = [k for k, p in enumerate(params) if p.ignore_eos]
    if no_eos:
        allowed[np.ix_(no_eos, sampler.stops)] = False
    masked = np.where(allowed, logits, -np.inf)
    tokens = np.argmax(masked, axis=1)
    temperature = np.array([p.temperature for p in params])
    hot = np.flatnonzero(temperature > 0)
    if hot.size:
        single = masked.astype(np.float32)
        shifted = single - single.max(axis=1, keepdims=True)
        divisor = np.where(temperature > 0, np.maximum(temperature.astype(np.float32), np.finfo(np.float32).tiny), 1.0)
        scaled = shifted / divisor.astype(np.float32)[:, None]  # float32 / float32
        weights = np.exp(scaled).astype(np.float64)
        top_p = np.array([p.top_p for p in params])
        nucleus = np.flatnonzero((top_p < 1.0) & (temperature > 0))
        if nucleus.size:
            part = weights[nucleus]
            weights[nucleus] = part * _nucleus(part / part.sum(axis=1, keepdims=True), top_p[nucleus])
        cdf = np.cumsum(weights / weights.sum(axis=1, keepdims=True), axis=1)
        cdf /= cdf[:, -1:]
        sampler.reference_weights = weights[hot]  # what _draw must get, bit for bit
        draws = np.full(len(rows), 2.0)
        draws[hot] = [rows[k].req.rng.random() for k in hot]
        sampled = np.minimum((cdf <= draws[:, None]).sum(axis=1), logits.shape[1] - 1)
        tokens[hot] = sampled[hot]
    return tokens


def test_the_in_place_pick_equals_the_pass_with_temporaries(runtime):
    """``Sampler._pick`` works in place on its logits (:func:`_reference_pick` is the pass it replaced): the same
    token for every row from the same weights, bit for bit, and as many numbers taken from each seeded generator,
    over batches that mix greedy and sampling rows, temperatures, top-p, penalties of both signs, thinking spans,
    ignored EOS, NaN and -inf logits, a repeated row state (the barred columns are kept per state), and the same
    requests again, in order (their parameters kept from the call before) and reversed."""
    _, _, tok = runtime
    sampler, seen = _spied_sampler(tok, 8)  # seen: each _draw's weights
    rng = np.random.default_rng(7)
    for case in range(200):
        n = int(rng.integers(1, 9))
        rows_ref, rows_new = [], []
        for slot in range(n):
            sampler.join(slot)
            for token in rng.choice(sampler.ids, size=int(rng.integers(0, 20))):
                sampler.count(slot, int(token))
            params = SamplingParams(temperature=float(rng.choice([0.0, 0.3, 0.7, 1.0, 1.5])),
                                    top_p=float(rng.choice([1.0, 0.85, 0.5, 0.05])),
                                    frequency_penalty=float(rng.choice([0.0, 0.0, 0.2, -0.4])),
                                    presence_penalty=float(rng.choice([0.0, 0.0, 0.5, -0.3])),
                                    ignore_eos=bool(rng.integers(0, 2)))
            thinking = bool(rng.integers(0, 2)) if case % 10 else True  # every tenth: one state for all rows
            seed = int(rng.integers(0, 2**31))
            for rows in (rows_ref, rows_new):  # one params object for both: the kept arrays are matched by identity
                rows.append(_seeded_row(slot, params, seed, thinking))
        logits = (rng.standard_normal((n, len(sampler.ids))) * 4).astype(np.float32).astype(np.float64)
        if case % 9 == 0:
            logits[0, int(rng.integers(0, logits.shape[1]))] = np.nan
        if case % 13 == 0:
            logits[-1, : logits.shape[1] // 2] = -np.inf
        # the same requests again (the parameters kept from the last call), then in reverse order (not kept)
        for again in ("first", "same", "reversed"):
            order = slice(None, None, -1) if again == "reversed" else slice(None)
            sampler.reference_weights, seen[:] = None, []
            want = _reference_pick(sampler, logits[order].copy(), rows_ref[order])
            got = sampler._pick(logits[order].copy(), rows_new[order])
            np.testing.assert_array_equal(got, want, err_msg=f"case {case}, {again}")
            if sampler.reference_weights is not None:  # the weights too, not only the tokens they gave
                np.testing.assert_array_equal(seen[-1].astype(np.float64), sampler.reference_weights,
                                              err_msg=f"case {case}, {again}")
            for a, b in zip(rows_ref, rows_new):  # as many numbers taken: the next ones are the same
                assert a.req.rng.random() == b.req.draws.take(), case


def test_the_two_level_draw_picks_the_one_level_pass_s_column(runtime):
    """``Sampler._draw`` (block sums, then one block's running sum) picks the column the normalized one-level
    running sum picks: over rows of every spread, rows with barred (zero) columns and blocks, weight only at the
    first or last column, a last block all zero with a draw next to 1, and a NaN row (its first column). A picked
    column always has weight; and the draws follow the distribution."""
    from autoglm_build.runtime.generation import Sampler

    _, _, tok = runtime
    sampler = Sampler(tok, slots=8)
    n = len(sampler.ids)
    assert n % 32, "the tiny vocabulary's last block is a short one"

    def one_level(weights, draws):
        cdf = np.cumsum(weights / weights.sum(axis=1, keepdims=True), axis=1)
        cdf /= cdf[:, -1:]
        return np.minimum((cdf <= draws[:, None]).sum(axis=1), n - 1)

    rng = np.random.default_rng(11)
    for case in range(2000):
        rows = int(rng.integers(1, 9))
        weights = np.exp(rng.standard_normal((rows, n)) * rng.choice([0.1, 1.0, 4.0, 12.0]))
        weights[:, rng.integers(0, n, int(rng.integers(0, 600)))] = 0.0
        if case % 7 == 0:
            weights[0, -(n % 32) - 64:] = 0.0  # the last blocks empty
        if case % 11 == 0:
            weights[-1] = 0.0
            weights[-1, rng.choice([0, n - 1, int(rng.integers(0, n))])] = 1.0
        draws = rng.random(rows)
        picked = sampler._draw(weights.copy(), draws)
        np.testing.assert_array_equal(picked, one_level(weights, draws), err_msg=f"case {case}")
        assert (weights[np.arange(rows), picked] > 0).all()
        if case % 5 == 0:  # a draw next to 1: a column with weight, with none but rounding's worth after it
            edge = sampler._draw(weights.copy(), np.full(rows, 1.0 - 2.0 ** -53))
            for row, column in enumerate(edge):
                assert weights[row, column] > 0
                assert weights[row, column + 1:].sum() <= 1e-12 * weights[row].sum(), (case, row, column)
    few = Sampler(tok, slots=2)  # more rows than the sampler's slots (a caller outside the scheduler)
    weights = np.exp(rng.standard_normal((5, n)))
    draws = rng.random(5)
    np.testing.assert_array_equal(few._draw(weights.copy(), draws), one_level(weights, draws))
    nan = np.ones((2, n))
    nan[1, 5] = np.nan
    assert sampler._draw(nan, np.array([0.5, 0.5]))[1] == 0
    # the frequencies of 20,000 draws over 6 columns of known weight (the rest barred)
    weights = np.zeros((1, n))
    columns = [3, 40, 41, 700, n - 2, n - 1]
    weights[0, columns] = [1, 2, 3, 4, 5, 5]
    counts = np.bincount([int(sampler._draw(weights, rng.random(1))[0]) for _ in range(20000)], minlength=n)
    assert counts.sum() == counts[columns].sum()
    expected = 20000 * np.array([1, 2, 3, 4, 5, 5]) / 20
    assert (((counts[columns] - expected) ** 2) / expected).sum() < 20.5  # chi-square, 5 dof: p < 0.001


def test_uniform_draws_are_the_generator_s_numbers_in_order():
    """``UniformDraws`` hands out a generator's numbers in the order single ``random()`` calls give them, across its
    blocks, as Python floats; a scheduler's prefill gives each request one on the request's own generator."""
    from autoglm_build.runtime.generation import UniformDraws

    for seed in (0, 1, 12345):
        draws, single = UniformDraws(np.random.default_rng(seed)), np.random.default_rng(seed)
        taken = [draws.take() for _ in range(3 * UniformDraws.BLOCK + 5)]
        assert taken == [single.random() for _ in range(len(taken))]
        assert all(type(x) is float for x in taken)


def test_a_sampled_row_draws_the_same_token_whatever_shares_its_batch(runtime):
    """A seeded row's token, and its generator's state after, are the same alone and beside rows with penalties (a
    float64 pass for the penalties) or without, in front or behind: its weights are the same numbers, bit for bit;
    float16 logits give their float32 values' token; a temperature too small for float32 division, or for float32 at
    all, picks what greedy picks."""
    _, _, tok = runtime
    sampler, seen = _spied_sampler(tok, 4)  # seen: each _draw's weights
    rng = np.random.default_rng(21)
    n = len(sampler.ids)
    row = _seeded_row

    for case in range(300):
        for slot in range(4):
            sampler.join(slot)
            for token in rng.choice(sampler.ids, size=int(rng.integers(0, 20))):
                sampler.count(slot, int(token))
        params = SamplingParams(temperature=float(rng.choice([0.3, 0.7, 1.0, 1.5])),
                                top_p=float(rng.choice([1.0, 0.9, 0.5])),
                                frequency_penalty=float(rng.choice([0.0, 0.0, 0.4])),
                                presence_penalty=float(rng.choice([0.0, 0.3])))
        neighbour = SamplingParams(temperature=float(rng.choice([0.0, 0.8])),
                                   frequency_penalty=float(rng.choice([0.0, 0.5, -0.2])))
        logits = (rng.standard_normal((2, n)) * rng.choice([1.0, 4.0, 12.0])).astype(np.float32)
        if case % 3 == 0:
            logits = logits.astype(np.float16)
        seed = int(rng.integers(0, 2**31))
        alone = row(0, params, seed)
        token = sampler._pick(logits[:1].copy(), [alone])[0]
        weights = seen[-1][0]
        for order in ((0, 1), (1, 0)):
            rows = [row(0, params, seed), row(1, neighbour, seed + 1)]
            both = sampler._pick(logits[list(order)].copy(), [rows[k] for k in order])
            assert both[order.index(0)] == token, (case, order)
            hot = [k for k in order if rows[k].req.params.temperature > 0]  # the rows _draw got, in batch order
            np.testing.assert_array_equal(seen[-1][hot.index(0)], weights, err_msg=f"case {case}, {order}")
            assert rows[0].req.draws.take() == alone.req.draws.take()
            alone = row(0, params, seed)
            sampler._pick(logits[:1].copy(), [alone])
        if case % 3 == 0:
            assert sampler._pick(logits[:1].astype(np.float32), [row(0, params, seed)])[0] == token
    logits = rng.standard_normal((1, n)).astype(np.float32)
    best = int(np.argmax(np.where(sampler.allowed & (np.arange(n) != sampler.close), logits[0], -np.inf)))
    for tiny in (1e-38, 1e-50):  # below float32's normal numbers, the second 0 in it: divided by its least normal
        assert sampler._pick(logits.copy(), [row(0, SamplingParams(temperature=tiny), 1)])[0] == best
