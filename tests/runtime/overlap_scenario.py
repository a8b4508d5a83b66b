"""Generations with the scheduler's decode overlap (issue 14) on and off, for a test to compare event for event.

:func:`compare` runs the same requests on one backend through a scheduler with ``overlap`` off and one with it
on: rows joining and leaving (``max_batch`` 3 of 7 requests) and all at once, greedy and seeded nucleus
sampling with penalties, a thinking span closed by its budget, ``max_tokens``, stop strings, a client that
cancels after its third event, and phone-agent-like prompts whose long system prompt the prefix cache reuses.
The stop strings are cut from what the serial scheduler generates without them, so they end rows mid-reply
on any backend; with overlap on, a row a stop string ends has the next step in flight (``stopped_in_flight``).
The first step each overlapped scheduler launches also tries the cache calls that must wait for it
(``refused``: those that raised).

Used in process on ONNX Runtime (tests/runtime/test_overlap.py) and under the fake TensorRT on the device
cache (tests/engine/fake_trt/drive_serve.py ``overlap``). Imports on the GPU harness's Python 3.9.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from autoglm_build.runtime.generation import Request, SamplingParams, Scheduler
from autoglm_build.runtime.text import ChatTokenizer, Prompt, Segment

TEXTS = ["打开微信", "Open the settings app and turn on dark mode " * 3, "你是谁?", "Book a table for two at 7pm",
         "在小红书上搜索成都旅游攻略" * 4, "Search for flights to Chengdu", "给妈妈发消息说我晚上回家"]
SEEDED = dict(temperature=0.8, top_p=0.9, frequency_penalty=0.3, presence_penalty=0.2)
# (text index, thinking, sampling, stop cut from the serial reply?, cancel after this many events)
REQUESTS = [(0, False, dict(temperature=0, max_tokens=10, ignore_eos=True), False, None),
            (1, False, dict(seed=3, max_tokens=16, **SEEDED), False, None),
            (2, True, dict(temperature=1.0, seed=7, max_tokens=14, thinking_budget=4), False, None),
            (3, False, dict(temperature=0, max_tokens=20, ignore_eos=True), True, None),
            (4, False, dict(seed=11, max_tokens=20, ignore_eos=True, **SEEDED), True, None),
            (5, False, dict(temperature=0.7, seed=5, max_tokens=20, ignore_eos=True), False, 3),
            (6, False, dict(temperature=0, max_tokens=5), False, None)]
RULES = "你是一个手机操作助手, 每一步只输出一个操作: do(action=\"Tap\", element=[x,y]) 或 finish(message=\"结果\")。\n"
SYSTEM = RULES * 24  # several 128-token blocks


def _cut(content: str) -> Optional[str]:
    """A stop string from the middle of a reply (two characters), or None if it is too short."""
    middle = len(content) // 2
    return content[middle:middle + 2] if len(content) >= 8 else None


class _Watch:
    """Counts rows a stop string ends while a step is in flight, and tries the refused calls once."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched, self.stopped_in_flight, self.refused = sched, 0, None
        deliver, launch = sched._deliver, sched.cache.decode_async

        def delivering(row, token, kind):
            before = row.finish
            deliver(row, token, kind)
            if row.finish == "stop" and before is None and sched.flight is not None:
                self.stopped_in_flight += 1

        def launching(ids, positions):
            step = launch(ids, positions)
            if self.refused is None:
                self.refused = self._try(ids, positions)
            return step

        sched._deliver, sched.cache.decode_async = delivering, launching

    def _try(self, ids: np.ndarray, positions: np.ndarray) -> List[str]:
        cache, refused = self.sched.cache, []
        calls = {"decode": lambda: cache.decode(ids, positions),
                 "decode_async": lambda: cache.decode_async(ids, positions),
                 "release": lambda: cache.release(0),
                 "move": lambda: cache.move(0, cache.slots - 1),
                 "fit": lambda: cache.fit(cache.capacity + 64),
                 "save_block": lambda: cache.save_block(0, 0, 1),
                 "prefill": lambda: cache.prefill([cache.slots - 1], [1], [], None)}
        for name, call in calls.items():
            try:
                call()
            except RuntimeError as exc:
                if "in flight" in str(exc):
                    refused.append(name)
        return refused


def _submit(sched: Scheduler, prompt: Prompt, params: Dict[str, Any], cancel_after: Optional[int],
            events: List[Dict[str, Any]]) -> Request:
    def emit(event: Dict[str, Any]) -> None:
        events.append(event)
        if cancel_after is not None and len(events) >= cancel_after:
            req.cancel()

    req = Request(prompt, SamplingParams(**params), emit=emit)
    sched.submit(req)
    return req


def _run(make, overlap: bool, batches: List[List[Tuple[Prompt, Dict[str, Any], Optional[int]]]]) -> Dict[str, Any]:
    """Each batch of requests submitted together, run to the end; events and tokens per request, in order."""
    sched = make(overlap)
    # a host cache computes each step at its launch, so the scheduler does not launch ahead there (it would only
    # hold the text back); told otherwise, it runs the overlap's path on ONNX Runtime too
    sched.cache.asynchronous = True
    watch = _Watch(sched)
    events: List[List[Dict[str, Any]]] = []
    tokens = []
    for batch in batches:
        reqs = []
        for prompt, params, cancel_after in batch:
            events.append([])
            reqs.append(_submit(sched, prompt, params, cancel_after, events[-1]))
        sched.run_until_idle()
        tokens += [r.token_ids for r in reqs]
    stats = sched.stats()
    assert sched.flight is None and stats["active"] == 0 and sched.cache.top == 0
    return {"cache": type(sched.cache).__name__, "events": events, "tokens": tokens, "selecting": sched.selecting,
            "stopped_in_flight": watch.stopped_in_flight, "refused": watch.refused or [],
            "overlapped_steps": stats["overlapped_steps"], "decode_steps": stats["decode_steps"],
            "prefix": stats["prefix_cache"]}


def _with_stops(make, batches, stopping: List[List[bool]]):
    """``batches`` with the stop strings cut from what the serial scheduler generates without them."""
    serial = _run(make, False, batches)["events"]
    replies = iter(["".join(e["content"] for e in evs if e["type"] == "delta") for evs in serial])
    out = []
    for batch, flags in zip(batches, stopping):
        out.append([])
        for (prompt, params, cancel_after), stop in zip(batch, flags):
            cut = _cut(next(replies))
            out[-1].append((prompt, dict(params, stop=[cut]) if stop and cut else params, cancel_after))
    return out


def compare(cfg: Any, backend: Any, tok: ChatTokenizer, select: bool = False) -> Dict[str, Dict[str, Any]]:
    """Per case, ``{"off": ..., "on": ...}``: each run's events and tokens per request, the rows stopped with
    a step in flight, the refused cache calls, the scheduler's step counts and its cache's class. ``select``: the
    tokens chosen on the GPU (the device cache's select engine; with overlap, steps launched on its ids)."""
    texts = [tok.chat_prompt([("user", [Segment(text=TEXTS[i])])], thinking) for i, thinking, *_ in REQUESTS]
    plain = [[(p, params, cancel) for p, (_, _, params, _, cancel) in zip(texts, REQUESTS)]]
    stopping = [[stop for *_, stop, _ in REQUESTS]]
    agent = [tok.chat_prompt([("system", [Segment(text=SYSTEM)]), ("user", [Segment(text=TEXTS[i])])], False)
             for i in (0, 3, 5)]
    agent_params = [dict(temperature=0, top_p=0.85, frequency_penalty=0.2, max_tokens=12, ignore_eos=True),
                    dict(seed=2, max_tokens=12, **SEEDED), dict(seed=4, max_tokens=12, ignore_eos=True, **SEEDED)]
    agent_batches = [[(agent[0], agent_params[0], None)], [(p, a, None) for p, a in zip(agent[1:], agent_params[1:])]]
    cases = {}
    for name, max_batch, reuse, batches, stops in (
            ("joining", 3, False, plain, stopping), ("batched", 8, False, plain, stopping),
            ("agent", 4, True, agent_batches, [[False], [True, True]])):
        def make(overlap: bool, max_batch: int = max_batch, reuse: bool = reuse) -> Scheduler:
            return Scheduler(backend, cfg, tok, max_batch=max_batch, queue_size=16, context=cfg.engine.context,
                             prefix_cache_bytes=None if reuse else 0, prefix_block=128, overlap=overlap,
                             device_select=select)
        batches = _with_stops(make, batches, stops)
        cases[name] = {"off": _run(make, False, batches), "on": _run(make, True, batches)}
    return cases


def with_failing_results(cfg: Any, backend: Any, tok: ChatTokenizer, failing=(2, 4),
                         failing_commits=(5,), select: bool = False, failing_noise=(7,)) -> Dict[str, Any]:
    """The device cache's steps launched ahead whose result raises (the logits' download, in the results
    ``failing``, with overlap on): the cache takes each such step back and the serial path runs it again.
    Events with overlap off and on, how many results failed, and how often a row's cache length was not its
    prompt's plus the tokens fed to it once a result was taken. Also a launch that raises halfway through its
    rows' commits (the mask element copies ``failing_commits``, counted over launches ahead): the rows it
    committed are taken back and the serial path runs the step again (``launch_failed``). ``select``: the same with
    the tokens chosen on the GPU, where a failing result is the download of a step's ids with the next step launched
    on them already: both are taken back, the rows' generators put back, and the serial path runs the step again on
    the same noise; and there the ``failing_noise``-th upload of a step's noise (overlap on) raises after the rows'
    streams gave their numbers (``noise_failed``): the streams are put back, and the step runs again on that noise."""
    texts = [tok.chat_prompt([("user", [Segment(text=TEXTS[i])])], thinking) for i, thinking, *_ in REQUESTS]
    batches = [[(p, params, cancel) for p, (_, _, params, _, cancel) in zip(texts, REQUESTS)]]
    results: List[bool] = []  # per result taken of a step launched ahead: did it fail?
    wrong: List[int] = []  # rows whose cache length is not their prompt's and fed tokens'
    commits: List[int] = []  # mask element copies made inside launches ahead
    launch_failed: List[int] = []
    noise_failed: List[int] = []

    def make(overlap: bool) -> Scheduler:
        sched = Scheduler(backend, cfg, tok, max_batch=3, queue_size=16, context=cfg.engine.context,
                          prefix_cache_bytes=0, overlap=overlap, device_select=select)
        if select:
            _failing_selected(sched, overlap, failing, failing_commits, results, wrong, commits, launch_failed)
            _failing_noise(sched, overlap, failing_noise, noise_failed)
            return sched
        download, land, landing = sched.cache._download_rows, sched._land, []

        def failing_download(*args):
            if landing:
                results.append(len(results) + 1 in failing)
                if results[-1]:
                    raise RuntimeError("cudaMemcpy2DAsync failed")
            return download(*args)

        def watched_land():
            landing.append(sched.flight)
            try:
                logits = land()
            finally:
                landing.pop()
            for row in sched.rows:  # the cache holds the prompt and every token fed (a failed step: taken back)
                fed = len(row.req.token_ids) - (1 if logits is None else 0)
                if sched.cache.lengths[row.slot] != len(row.req.prompt.ids) + fed:
                    wrong.append(row.req.id)
            return logits
        sched.cache._download_rows, sched._land = failing_download, watched_land
        _failing_commits(sched, "_launch", failing_commits, commits, launch_failed)
        return sched
    return {"off": _run(make, False, batches), "on": _run(make, True, batches), "failed": sum(results),
            "wrong_lengths": len(wrong), "launch_failed": len(launch_failed), "noise_failed": len(noise_failed)}


def _failing_noise(sched: Scheduler, overlap: bool, failing_noise, noise_failed: List[int]) -> None:
    """With overlap on, the ``failing_noise``-th upload of a step's noise raises (after the rows' streams handed out
    their numbers into the page-locked buffer)."""
    selector = sched.cache.selector
    upload, uploads = selector.device.upload, []

    def failing_upload(ptr, host):
        if overlap and ptr == selector.ptrs["noise"]:
            uploads.append(1)
            if len(uploads) in failing_noise:
                noise_failed.append(1)
                raise RuntimeError("cudaMemcpyAsync failed")
        return upload(ptr, host)
    selector.device.upload = failing_upload


def _failing_commits(sched: Scheduler, launcher: str, failing_commits, commits: List[int],
                     launch_failed: List[int]) -> None:
    """A commit's mask element copy (from the shard's 1s: one per run of rows committed together) raises at the
    ``failing_commits``-th launch ahead (made by the scheduler's method ``launcher``)."""
    launching: List[int] = []
    launch = getattr(sched, launcher)

    def watched():
        launching.append(1)
        try:
            return launch()
        finally:
            launching.pop()
    setattr(sched, launcher, watched)
    for shard in sched.cache.shards:
        copy2d = shard.device.copy2d

        def failing_copy(dst, *args, copy2d=copy2d, one=shard.one_ptr):
            if launching and args[1] == one:
                commits.append(1)
                if len(commits) in failing_commits and sched.cache.top > 1:
                    launch_failed.append(1)
                    raise RuntimeError("cudaMemcpy2DAsync failed")
            return copy2d(dst, *args)
        shard.device.copy2d = failing_copy


def _failing_selected(sched: Scheduler, overlap: bool, failing, failing_commits, results: List[bool],
                      wrong: List[int], commits: List[int], launch_failed: List[int]) -> None:
    """:func:`with_failing_results`' failures with the select engine: the ``failing``-th ids taken with a step launched
    ahead (overlap on) raise; a launch ahead's commit copy as there; after each step every running row's cache
    length is its prompt's plus the tokens fed (the last one taken is fed by the step launched ahead, if any)."""
    selector, decode, ids = sched.cache.selector, sched._decode_selected, sched.cache.selector.ids

    def failing_ids(turn, n):
        if overlap and sched.flight is not None:
            results.append(len(results) + 1 in failing)
            if results[-1]:
                raise RuntimeError("cudaEventSynchronize failed")
        return ids(turn, n)

    def watched_decode():
        decode()
        for row in sched.rows:
            if row.finish is None and not row.req.cancelled:
                fed = len(row.req.token_ids) - 1 + (1 if sched.flight is not None else 0)
                if sched.cache.lengths[row.slot] != len(row.req.prompt.ids) + fed:
                    wrong.append(row.req.id)
    selector.ids, sched._decode_selected = failing_ids, watched_decode
    _failing_commits(sched, "_launch_ahead", failing_commits, commits, launch_failed)


def on_workdir(workdir: Path, backend_name: str, precision: str, select: bool = False) -> Dict[str, Any]:
    """:func:`compare` on a workdir's embed and decoder (and, on the device cache, ``failing_results``); ``select``:
    with the tokens chosen on the GPU."""
    from autoglm_build.calibration import tokenizer_for
    from autoglm_build.config import BuildConfig
    from autoglm_build.manifest import Manifest
    from autoglm_build.runtime.backends import open_backend

    cfg = BuildConfig.model_validate(Manifest.load(workdir).config)
    tok = ChatTokenizer(tokenizer_for(cfg)[0], cfg.text.vocab_size)
    backend = open_backend(workdir, ["embed", "decoder"], backend_name, precision)
    try:
        out = compare(cfg, backend, tok, select)
        if out["joining"]["on"]["cache"] == "DeviceKVCache":
            out["failing_results"] = with_failing_results(cfg, backend, tok, select=select)
        return out
    finally:
        backend.close()
