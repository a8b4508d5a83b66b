"""The app's routes are module-level (one ``APIRouter``) and reach the server's state through a
dependency, so two apps in one process each serve their own state."""

from __future__ import annotations

from fastapi.testclient import TestClient

from autoglm_build.config import load_config
from autoglm_build.serve.app import ServerState, create_app, get_state, router
from tests.conftest import TINY


class _Scheduler:
    running, context, max_batch, queue_size = True, 64, 1, 0

    def stats(self):
        return {"active": 0, "waiting": 0, "tokens": 12,
                "prefix_cache": {"hits": 3, "tokens_reused": 512, "evictions": 1, "bytes": 4096}}


class _Backend:
    files = {}

    def describe(self):
        return {"backend": "fake", "precision": "fp32"}


def _state(model_ids, api_key=None) -> ServerState:
    return ServerState(cfg=load_config(TINY), backend=_Backend(), tokenizer=None, scheduler=_Scheduler(),
                       api_key=api_key, model_ids=model_ids)


def _ids(resp):
    assert resp.status_code == 200, resp.text
    return [m["id"] for m in resp.json()["data"]]


def test_two_apps_serve_their_own_state():
    first = TestClient(create_app(_state(("first",))))
    second = TestClient(create_app(_state(("second",), api_key="k2")))
    assert _ids(first.get("/v1/models")) == ["first"]
    assert second.get("/v1/models").status_code == 401
    assert _ids(second.get("/v1/models", headers={"Authorization": "Bearer k2"})) == ["second"]
    resp = first.post("/v1/chat/completions", json={"model": "second", "messages": [{"role": "user", "content": "x"}]})
    assert resp.status_code == 404 and "this server serves first" in resp.json()["error"]["message"]


def test_routes_are_module_level_and_state_is_a_dependency():
    paths = {route.path for route in router.routes}
    assert paths == {"/health", "/ready", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}
    asgi = create_app(_state(("served",)))
    asgi.app.dependency_overrides[get_state] = lambda: _state(("overridden",))
    assert _ids(TestClient(asgi).get("/v1/models")) == ["overridden"]


def test_metrics_are_prometheus_text_with_the_prefix_cache_counters():
    resp = TestClient(create_app(_state(("served",)))).get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    lines = resp.text.splitlines()
    for line in ("autoglm_active 0", "autoglm_tokens_total 12", "autoglm_prefix_cache_hits_total 3",
                 "autoglm_prefix_cache_tokens_reused_total 512", "autoglm_prefix_cache_evictions_total 1",
                 "# TYPE autoglm_prefix_cache_bytes gauge", "autoglm_prefix_cache_bytes 4096"):
        assert line in lines


def test_stream_chunks_built_around_the_value_equal_whole_chunks():
    """The per-token chunk (its JSON made once per stream around the delta) is the full chunk's text."""
    from autoglm_build.serve.app import Chunks

    events = [{"type": "delta", "reasoning": r, "content": c} for r, c in
              [("", "打开"), ("想\n", ""), ("a\"b\\", "c\u2028d"), ("", "")]]
    for chat in (True, False):
        for reasoning in (True, False):
            fast, slow = Chunks("chatcmpl-1", 7, "m\"x", chat), Chunks("chatcmpl-1", 7, "m\"x", chat)
            for event in events:
                got = fast.delta(event, reasoning)
                text = event["content"] if reasoning or not chat else event["reasoning"] + event["content"]
                if not chat:
                    want = slow.event(text=event["content"]) if event["content"] else None
                else:
                    delta = {"content": text} if text else {}
                    if reasoning and event["reasoning"]:
                        delta["reasoning_content"] = event["reasoning"]
                    want = slow.event(delta) if delta else None
                assert got == want


def _bridged(kinds, steps: int = 60, step_s: float = 0.001, interval: float = 0.01, ticks: bool = True,
             pacing: bool = True):
    """A scheduler stand-in on its own thread, emitting through the loop's :class:`EventBridge`: each step ticks
    (unless ``ticks`` is off), sleeps ``step_s`` (the engine call), then emits one delta per request, and after
    ``steps`` steps each request's done event. ``kinds``: per request, ``stream`` (a stream with ``interval``),
    ``eager`` (a stream with no interval) or ``whole`` (a whole answer); ``pacing``: the bridge's (the app sets it
    for a scheduler whose engine calls hold its thread). Returns per request the ``(seconds since
    the first step, event)`` its reader took, when the first delta and the done events were emitted, and the
    loop's wakeups."""
    import asyncio
    import threading
    import time

    from autoglm_build.serve.app import EventQueue, bridge, queued_events

    async def main():
        loop = asyncio.get_running_loop()
        found = bridge(loop)
        found.interval, found.pacing = interval, pacing
        queues = [EventQueue(found, eager=kind != "whole") for kind in kinds]
        marks = {}

        def scheduler():
            start = marks["start"] = time.perf_counter()
            for step in range(steps):
                if ticks:
                    found.tick()
                time.sleep(step_s)
                if step == 0:
                    marks["first"] = time.perf_counter() - start
                for k, q in enumerate(queues):
                    found.emit(q, {"type": "delta", "reasoning": "", "content": f"{k}.{step} "})
            marks["done"] = time.perf_counter() - start
            for q in queues:
                found.emit(q, {"type": "done", "finish_reason": "length"})

        async def read(q, kind):
            got = []
            async for event in queued_events(q, interval if kind == "stream" else 0.0):
                got.append((time.perf_counter(), event))
            return got

        readers = [asyncio.ensure_future(read(q, kind)) for q, kind in zip(queues, kinds)]
        await asyncio.sleep(0.01)  # every reader waits on its queue before the first step
        thread = threading.Thread(target=scheduler)
        thread.start()
        got = await asyncio.wait_for(asyncio.gather(*readers), 30)
        thread.join()
        return [[(t - marks["start"], e) for t, e in events] for events in got], marks, found.wakeups, found

    return asyncio.run(main())


def test_event_bridge_delivers_every_event_in_order_and_refuses_a_closed_loop():
    """Events from the scheduler's thread reach each reader in order and whole, whatever the reader (a paced
    stream, a stream with no interval, a whole answer); once the loop is closed, emitting raises (the scheduler
    ends the row)."""
    import pytest

    got, _, _, found = _bridged(["stream", "eager", "whole", "stream"], steps=40)
    for k, events in enumerate(got):
        assert [e["type"] for _, e in events][-1] == "done"
        assert "".join(e["content"] for _, e in events[:-1]) == "".join(f"{k}.{step} " for step in range(40))
    with pytest.raises(RuntimeError):
        found.emit(None, {"type": "delta"})
    found.paced.add(object())  # a stream that paused when the loop closed: the tick finds no loop to wake
    found.due, found.scheduled = 0.0, False
    found.tick()


def test_paced_streams_wake_the_loop_once_per_interval_on_the_scheduler_s_tick_and_the_ends_at_once():
    """With a stream interval, the scheduler's deltas do not wake the loop one by one: its ticks do, at most once
    per interval, for every paced stream at once (the chunks then go out while the engine runs). The first delta
    and the done events still wake it at once; a whole answer's deltas never do, its done event does."""
    steps, interval = 120, 0.012
    got, marks, wakeups, _ = _bridged(["stream"] * 4, steps=steps, interval=interval)
    # one wakeup per interval (~10 in 120 ms of steps), the first deltas', the done events': far fewer than the
    # 480 deltas, or the 120 steps (a loaded machine adds a few: a stream that waits past its pause listens)
    duration = marks["done"]
    assert wakeups < steps / 3, (wakeups, duration)
    for events in got:
        deltas = [t for t, e in events if e["type"] == "delta"]
        assert deltas[0] - marks["first"] < interval / 2, (deltas[0], marks["first"])  # the first token at once
        # chunks an interval apart (the ticks' spacing, a step of slack; never under half of it), not one per step;
        # the last goes with the done event, at once
        gaps = sorted(b - a for a, b in zip(deltas, deltas[1:-1]))
        assert len(deltas) <= duration / interval + 3, deltas
        assert gaps[0] >= interval / 2 and interval - 0.002 <= gaps[len(gaps) // 2] < 1.5 * interval, gaps
        assert events[-1][0] - marks["done"] < interval / 2  # the end is not held back
    # beside a stream with no interval (its every delta wakes the loop, so the ticks find a flush scheduled and
    # skip): that flush ends the paced streams' pauses too, an interval apart still
    mixed, _, _, _ = _bridged(["stream"] * 3 + ["eager"], steps=steps, interval=interval)
    for events in mixed[:3]:
        deltas = [t for t, e in events if e["type"] == "delta"]
        gaps = sorted(b - a for a, b in zip(deltas, deltas[1:-1]))
        assert gaps[0] >= interval / 2 and gaps[len(gaps) // 2] < 1.5 * interval, gaps
    # without pacing (a scheduler that launches its steps ahead) each stream's own timer ends its pause, an interval
    # after its last chunk; the deltas still wake nothing
    timed, marks, wakeups, _ = _bridged(["stream"] * 4, steps=steps, interval=interval, ticks=False, pacing=False)
    assert wakeups < steps / 3, wakeups
    for events in timed:
        deltas = [t for t, e in events if e["type"] == "delta"]
        gaps = sorted(b - a for a, b in zip(deltas, deltas[1:-1]))
        assert gaps[0] >= interval - 0.001 and gaps[len(gaps) // 2] < 1.5 * interval, gaps
    whole, marks, wakeups, _ = _bridged(["whole"] * 3, steps=30, interval=interval)
    assert 1 <= wakeups <= 3  # the done events' alone (one of them, or each if the loop flushed between them)
    for k, events in enumerate(whole):  # every delta (joined where they waited together), then the done event
        assert events[-1][1]["type"] == "done" and events[-1][0] >= marks["done"]
        assert "".join(e["content"] for _, e in events[:-1]) == "".join(f"{k}.{step} " for step in range(30))


def test_paced_streams_go_on_when_the_scheduler_s_ticks_stop():
    """A paced stream whose ticks never come (a scheduler that does not call them) still gets its deltas, an
    interval after its pause ends at the latest: the pause's own timer flushes the bridge."""
    interval = 0.01
    got, marks, _, _ = _bridged(["stream"], steps=60, step_s=0.001, interval=interval, ticks=False)
    deltas = [t for t, e in got[0] if e["type"] == "delta"]
    assert 2 <= len(deltas) and max(b - a for a, b in zip(deltas, deltas[1:])) < 2 * interval + 0.01, deltas
    assert "".join(e["content"] for _, e in got[0][:-1]) == "".join(f"0.{step} " for step in range(60))


def test_deltas_waiting_together_go_out_as_one_and_the_text_is_unchanged():
    """A stream that fell behind (several deltas queued) gets them joined into one event, in order: the
    reasoning before the content, never reasoning that came after content folded ahead of it; the done event
    after. A stream that keeps up gets each delta alone. Either way the text read is the same."""
    import asyncio

    from autoglm_build.serve.app import queued_events

    def delta(reasoning="", content=""):
        return {"type": "delta", "reasoning": reasoning, "content": content}

    done = {"type": "done", "finish_reason": "stop"}
    backlog = [delta("th", ""), delta("ink", ""), delta("", "Hel"), delta("", "lo"), delta("late", ""),
               delta("", "!"), done]

    async def drain(events, keep_up: bool):
        queue: asyncio.Queue = asyncio.Queue()
        got = []
        if not keep_up:
            for event in events:
                queue.put_nowait(event)
            return [e async for e in queued_events(queue)]
        stream = queued_events(queue)
        for event in events:
            queue.put_nowait(event)
            got.append(await stream.__anext__())
        return got

    behind = asyncio.run(drain(backlog, keep_up=False))
    assert behind == [delta("think", "Hello"), delta("late", "!"), done]
    alone = asyncio.run(drain(backlog, keep_up=True))
    assert alone == backlog

    def text(events):
        return "".join(e["reasoning"] + "|" + e["content"] for e in events if e["type"] == "delta").replace("|", "")

    assert text(behind) == text(alone) == "thinkHellolate!"


def _stream(interval: float, tokens: int = 24, gap: float = 0.002):
    """The app's stream over an :class:`EventQueue` a producer fills with one delta per token every ``gap`` seconds,
    then the done event: ``(when, text)`` of each chunk with text, and when the finish chunk went out."""
    import asyncio
    import json
    import time
    from types import SimpleNamespace

    from autoglm_build.serve.app import EventQueue, queued_events, stream_chunks

    async def main():
        queue = EventQueue()

        async def produce():
            for i in range(tokens):
                queue.put_nowait({"type": "delta", "reasoning": "", "content": f"t{i} "})
                await asyncio.sleep(gap)
            queue.put_nowait({"type": "done", "finish_reason": "length", "usage": {"completion_tokens": tokens}})
            return time.perf_counter() - start

        start = time.perf_counter()
        producer = asyncio.ensure_future(produce())
        lines = []
        async for line in stream_chunks(queued_events(queue, interval), SimpleNamespace(cancel=lambda: None), "id", 0,
                                        "m", True, False, True):
            lines.append((time.perf_counter() - start, line))
        return lines, await producer

    lines, done_at = asyncio.run(main())
    chunks = [(t, json.loads(line[len("data: "):])) for t, line in lines if line.startswith("data: {")]
    texts = [(t, c["choices"][0]["delta"].get("content")) for t, c in chunks if c["choices"]]
    finish = next(t for t, c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    return [(t, text) for t, text in texts if text], finish - done_at


def test_a_stream_interval_joins_the_tokens_between_chunks_into_one_and_sends_the_first_and_the_end_at_once():
    """serve.stream_interval_ms: the same text in fewer chunks, none sooner than the interval after the one before
    (a producer at one token every 2 ms, an interval of 20 ms); the first token alone; the last tokens and the finish
    chunk as soon as the done event is in, not an interval later. Without it, a chunk per token."""
    text = "".join(f"t{i} " for i in range(24))
    every, _ = _stream(0.0)
    assert [c for _, c in every] == [f"t{i} " for i in range(24)]
    joined, finish_delay = _stream(0.02)
    assert "".join(c for _, c in joined) == text
    assert joined[0][1] == "t0 "
    assert 2 <= len(joined) < 24, joined
    # each chunk an interval after the one before, but the last: the done event ends the wait, with what is left
    assert all(b - a >= 0.019 for (a, _), (b, _) in zip(joined[:-1], joined[1:-1])), joined
    assert finish_delay < 0.015, finish_delay  # the end is not held back by the interval (20 ms)
    # a last token and the done event 1 ms after the first chunk, with 100 ms to wait: both go out at once
    short, finish_delay = _stream(0.1, tokens=2, gap=0.001)
    assert [c for _, c in short] == ["t0 ", "t1 "] and finish_delay < 0.05, (short, finish_delay)


def test_the_stream_interval_override_is_checked_before_any_engine_loads(monkeypatch, tmp_path):
    """``$AUTOGLM_BUILD_STREAM_INTERVAL_MS`` not a number of ms in [0, 1000]: one line naming it, nothing loaded."""
    import pytest

    from autoglm_build.errors import UserError
    from autoglm_build.serve.server import STREAM_INTERVAL_ENV, build_state, stream_interval

    cfg = load_config(TINY)
    monkeypatch.setenv(STREAM_INTERVAL_ENV, "2.5")
    assert stream_interval(cfg) == 0.0025
    for bad in ("fast", "-1", "5000"):
        monkeypatch.setenv(STREAM_INTERVAL_ENV, bad)
        with pytest.raises(UserError, match=STREAM_INTERVAL_ENV):
            build_state(cfg, tmp_path / "no-build")
    monkeypatch.delenv(STREAM_INTERVAL_ENV)
    assert stream_interval(cfg) == cfg.serve.stream_interval_ms / 1000


def test_the_app_paces_streams_on_the_scheduler_s_ticks_only_where_its_engine_calls_hold_its_thread():
    """The app's lifespan hands the scheduler its loop's ``EventBridge.tick`` (and sets the bridge's pacing) when the
    scheduler's steps run on its own thread (ONNX Runtime), not when it launches them ahead (the GPU); both are
    undone when the app stops."""
    import asyncio

    from autoglm_build.serve.app import bridge

    class Scheduler(_Scheduler):
        tick = None

        def __init__(self, overlapping):
            self.overlapping = overlapping

        def start(self, cpus=None):
            pass

        def stop(self):
            pass

    class Backend(_Backend):
        def close(self):
            pass

    for overlapping in (False, True):
        scheduler = Scheduler(overlapping)
        state = ServerState(cfg=load_config(TINY), backend=Backend(), tokenizer=None, scheduler=scheduler,
                            model_ids=["m"])
        with TestClient(create_app(state)) as client:
            loop = client.portal.call(asyncio.get_running_loop)
            found = bridge(loop)
            assert found.pacing is (not overlapping)
            assert (scheduler.tick == found.tick) is (not overlapping) and (scheduler.tick is None) is overlapping
        assert scheduler.tick is None and not found.pacing
