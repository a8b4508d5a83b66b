"""The scheduler's decode overlap (``serve.overlap``, issue 14): step N+1 is launched before step N's text work.

On ONNX Runtime (``tests.runtime.overlap_scenario``: rows joining and leaving, sampling with penalties, stop
strings, cancellation, prefix reuse) every event equals the serial scheduler's. Over a stand-in cache whose
steps finish later than they are launched, the order of the calls shows the overlap, no call that changes the
cache comes while a step is in flight, and a step that fails at its launch or its result is run again serially.
The fake TensorRT's device cache runs the same scenario in tests/runtime/test_device_cache.py.
"""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np
import pytest

from autoglm_build.calibration import tokenizer_for
from autoglm_build.config import load_config
from autoglm_build.runtime.generation import Request, SamplingParams, Scheduler
from autoglm_build.runtime.kv_cache import KVCache, Step
from autoglm_build.runtime.text import ChatTokenizer, Segment
from tests.conftest import TINY
from tests.runtime.overlap_scenario import compare

REFUSED = ["decode", "decode_async", "release", "move", "fit", "save_block", "prefill"]


def test_overlap_generates_every_event_the_serial_scheduler_does(runtime):
    cases = compare(*runtime)
    for name, case in cases.items():
        on, off = case["on"], case["off"]
        assert on["cache"] == "OrtKVCache"
        assert on["events"] == off["events"], name
        assert on["tokens"] == off["tokens"], name
        assert off["overlapped_steps"] == 0 and on["overlapped_steps"] >= on["decode_steps"] // 2, name
        assert on["stopped_in_flight"] >= 1 and off["stopped_in_flight"] == 0, name
        assert on["refused"] == REFUSED, name
        finishes = [evs[-1].get("finish_reason") for evs in on["events"]]
        assert "stop" in finishes and "length" in finishes, name
    assert cases["joining"]["on"]["events"] == cases["batched"]["on"]["events"]
    cancelled = cases["batched"]["on"]["events"][5]
    assert len(cancelled) == 3 and {e["type"] for e in cancelled} == {"delta"}  # no event after the cancel
    assert cases["agent"]["on"]["prefix"]["hits"] == 2


# ---- a stand-in cache: steps that finish after their launch ----------------------------------------


class LateCache(KVCache):
    """The host cache's slot bookkeeping without arrays. A row's logits depend on its (token, position) alone;
    ``decode_async`` returns at once and the logits come with ``result()``. Every call goes into ``log``; a
    call that changes the cache while a step is in flight goes into ``violations`` too (and raises)."""

    asynchronous = True

    def __init__(self, spec: Any, slots: int, context: int, vocab: int) -> None:
        self.vocab, self.log, self.violations = vocab, [], []
        self.failing: Dict[str, set] = {"launch": set(), "result": set()}  # launch numbers that raise
        self.launches = 0
        super().__init__(None, spec, slots, context)

    def _allocate(self, capacity: int) -> None:
        self.capacity = capacity

    def _note(self, call: str) -> None:
        self.log.append(call)
        if self.in_flight:
            self.violations.append(call)
            raise RuntimeError(f"KV cache: {call} while a decode step is in flight")

    def _logits(self, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return np.stack([np.random.default_rng([int(i), int(p)]).standard_normal(self.vocab).astype(np.float32) * 4
                         for i, p in zip(ids[:, -1], positions[:, 0, -1])])

    def prefill(self, slots, lengths, chunks, prefixes=None):
        self._note("prefill")
        chunk = list(chunks)[-1]
        for slot, n in zip(slots, lengths):
            self._take(slot, n)
        return self._logits(chunk.ids, chunk.positions)

    def release(self, slot: int) -> None:
        self._note("release")
        super().release(slot)

    def move(self, source: int, target: int) -> None:
        self._note("move")
        self._take(target, int(self.lengths[source]))
        KVCache.release(self, source)

    def decode(self, ids, positions, slot=None, commit=True):
        self._note("decode")
        return self._step(ids, positions, commit)

    def _step(self, ids, positions, commit=True):
        if commit:
            self.lengths[self.used] += 1
        return self._logits(ids, positions)

    def decode_async(self, ids, positions) -> Step:
        self._note("launch")
        self.launches += 1
        n = self.launches
        if n in self.failing["launch"]:
            raise RuntimeError("launch failed")
        logits, used = self._step(ids, positions), self.used.copy()

        def result() -> np.ndarray:
            self.log.append("result")
            if n in self.failing["result"]:
                self.lengths[used] -= 1  # the step is taken back, as the device cache does
                raise RuntimeError("device lost")
            return logits
        return Step(self, result)


class LateBackend:
    max_batch = context = prefill_chunk = prefill_batch = None

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def kv_cache(self, spec, slots, context):
        return LateCache(spec, slots, context, self.vocab)


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config(TINY)
    return cfg, ChatTokenizer(tokenizer_for(cfg)[0], cfg.text.vocab_size)


def _late_run(tiny, overlap: bool, params: List[Dict[str, Any]], max_batch: int = 8, fail=None):
    """Requests (one per ``params``) over a :class:`LateCache`; (scheduler, events per request, the cache's log,
    where the events and each token's text work are noted too)."""
    cfg, tok = tiny
    sched = Scheduler(LateBackend(cfg.text.vocab_size), cfg, tok, max_batch=max_batch, queue_size=64,
                      context=cfg.engine.context, prefix_cache_bytes=0, overlap=overlap)
    for kind, numbers in (fail or {}).items():
        sched.cache.failing[kind] = set(numbers)
    deliver = sched._deliver

    def text(row, token, kind):  # a token's text work, which sends its delta when it has text
        sched.cache.log.append("text")
        deliver(row, token, kind)
    sched._deliver = text
    events: List[List[Dict[str, Any]]] = []
    for i, p in enumerate(params):
        events.append([])
        prompt = tok.chat_prompt([("user", [Segment(text=f"第{i}个请求: 打开设置")])], False)

        def emit(event, out=events[-1]):
            sched.cache.log.append(f"emit {event['type']}")
            out.append(event)
        sched.submit(Request(prompt, SamplingParams(**p), emit=emit))
    sched.run_until_idle()
    assert sched.cache.violations == [] and sched.flight is None and sched.cache.top == 0
    return sched, events, sched.cache.log


def test_step_n_plus_1_is_launched_before_step_n_is_streamed_and_nothing_changes_the_cache_meanwhile(tiny):
    params = [dict(temperature=0, max_tokens=6, ignore_eos=True)]
    sched, events, log = _late_run(tiny, True, params)
    # the prefill's token; the first decode step runs alone (nothing was launched ahead); then each step's
    # text goes out after the next step's launch, but for the last token's
    assert [c for c in log if c != "emit delta"] == ["prefill", "text", "decode", "launch", "text"] + \
        ["result", "launch", "text"] * 3 + ["result", "text", "emit done", "release"], log
    assert all(log[k - 1] == "text" for k, c in enumerate(log) if c == "emit delta")
    assert log.count("emit delta") >= 4
    assert sched.stats()["overlapped_steps"] == 4 and sched.stats()["decode_steps"] == 5
    _, serial_events, serial_log = _late_run(tiny, False, params)
    assert "launch" not in serial_log and serial_events == events


SAMPLED = [dict(temperature=0, max_tokens=9, ignore_eos=True),
           dict(temperature=0.8, top_p=0.9, seed=1, frequency_penalty=0.5, presence_penalty=0.3, max_tokens=14),
           dict(temperature=1.0, seed=2, max_tokens=30, stop=["a"]),
           dict(temperature=0.7, seed=3, max_tokens=12, ignore_eos=True),
           dict(temperature=0, max_tokens=3)]


@pytest.mark.parametrize("max_batch", [2, 8])
def test_the_stand_in_generates_the_serial_events_with_rows_joining_leaving_and_stopping(tiny, max_batch):
    serial = _late_run(tiny, False, SAMPLED, max_batch)[1]
    sched, overlapped, log = _late_run(tiny, True, SAMPLED, max_batch)
    assert overlapped == serial
    assert serial[2][-1]["finish_reason"] == "stop" and len(serial[2]) > 2  # the stop string "a" ends it
    assert sched.stats()["overlapped_steps"] > 0 and log.count("launch") == sched.stats()["overlapped_steps"]


@pytest.mark.parametrize("kind", ["launch", "result"])
def test_a_step_that_fails_ahead_is_run_again_serially(tiny, kind):
    """The 2nd and 3rd steps launched ahead raise (at the launch, or when their result is taken): the serial
    path runs them again, and every row generates what it generates without the failures."""
    serial = _late_run(tiny, False, SAMPLED)[1]
    clean = _late_run(tiny, True, SAMPLED)[2]
    _, events, log = _late_run(tiny, True, SAMPLED, fail={kind: {2, 3}})
    assert events == serial
    assert log.count("decode") > clean.count("decode")  # the serial path ran them
