"""The server's host work per decode step, with the engine taken out: a scheduler over a stand-in KV
cache whose decode returns precomputed logits at once, so every microsecond a step takes is the
scheduler's own (sampling, penalties, detokenization, stop checks, event emission).

Two paths, both with ``--rows`` concurrent requests of ``--tokens`` tokens (EOS ignored, so every row
runs to the end), sampled like ``benchmarks/serve_load.py`` samples (temperature 0.7, a seed per request):

- ``scheduler``: ``Scheduler.step`` in this thread, events appended to lists (sampling and text only);
- ``server``: the scheduler on its own thread as ``serve`` runs it, events through the app's own
  ``submit`` onto an asyncio loop on this thread, which turns them into SSE chunks with the app's
  ``stream_chunks`` (everything of the server's but uvicorn and the socket). The two threads share
  the GIL as they do in the server.

Also ``greedy`` (temperature 0) and ``penalties`` (top-p 0.85, frequency penalty 0.2: the phone agent's
requests) on the scheduler path. Prints microseconds per decode step (median of ``--repeat`` runs).

Measured on the 2-core CPU dev machine (8 rows, 128 tokens; wall us/step, median of 3, with another
job sharing the CPU, so +-30%), before the changes that came with this script: scheduler 653, server
1,123, greedy 273, penalties 1,026. After them (sampler's partial top-p sort, event bridge, SSE frames,
remembered one-token decodes), CPU us/step median of 5: scheduler ~490-530, server ~760-870, greedy
~240, penalties ~690-850 (the temperature-only path is mostly the sampler's exp and cumsum over 8 x 1,238
ids, ~100 us, which must stay bit-identical, plus ~20 us per row of detokenization and events).
On the H200, serve_load's 8 streams showed ~750 us of host work per step (1.64 ms vs the engine's 0.87).

``http``: ``serve`` itself (uvicorn, the app, the scheduler thread) over the stand-in cache in a child process, its
streams read by ``serve_load.py``'s lean client from this one; CPU is the child's. ``--select``: the stand-in chooses
the tokens on the "GPU" (``serve.device_select``) and the scheduler launches each step on them ahead. The ``server``
and ``http`` cases stream with the config's ``serve.stream_interval_ms``, as ``serve`` does.

Every case runs with ``serve.overlap`` off and on. ``--gpu-us N`` stands in for the engine's step time: a
step's logits come back no earlier than N microseconds after its launch (the launch itself returns at once;
the wait sleeps, releasing the GIL as a CUDA sync does). Off, a step's wall time is then N plus the host
work; on, step N's text work (detokenizing, stop strings, events) runs while step N+1 is "on the GPU",
and the rest (the logits' wait, the sampler's pick, the launch) stays between two steps: the next step's ids
are what the pick chose. Measured on the 2-core dev CPU with ``--gpu-us 900`` (the H200's tiny-config step
at 8 rows), wall us/step off -> on, median of 5 (+-10 % between runs): 1 row scheduler 1,514 -> 1,350,
server 1,559 -> 1,342; 8 rows scheduler 1,818 -> 1,690, server 1,858 -> 1,577, penalties 2,261 -> 1,980,
greedy 1,395 -> 1,297. Without ``--gpu-us`` the two are equal within the noise (8 rows server 911 / 897).

    python benchmarks/step_overhead.py [--rows 1,8] [--tokens 128] [--repeat 5] [--gpu-us 900] [--select]
        [--profile scheduler]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoglm_build.calibration import tokenizer_for  # noqa: E402
from autoglm_build.config import load_config  # noqa: E402
from autoglm_build.runtime.device_select import DeviceSelect  # noqa: E402
from autoglm_build.runtime.generation import Request, Sampler, SamplingParams, Scheduler  # noqa: E402
from autoglm_build.runtime.kv_cache import KVCache, Step  # noqa: E402
from autoglm_build.runtime.text import ChatTokenizer, Segment  # noqa: E402
from autoglm_build.serve.app import stream_chunks, submit  # noqa: E402
from autoglm_build.serve.server import OVERLAP_ENV, stream_interval  # noqa: E402

MESSAGE = "第{}个请求: 打开设置并开启深色模式"
TINY = ROOT / "configs" / "autoglm-phone-tiny.yaml"


class InstantCache(KVCache):
    """Slot bookkeeping of the host cache, no arrays: prefill and decode return precomputed logits; a decode
    step's logits are ready ``gpu_us`` after its launch (:meth:`decode` waits for them, :meth:`decode_async`
    returns at once and its result waits)."""

    asynchronous = True

    def __init__(self, spec, slots: int, context: int, vocab: int, gpu_us: float = 0.0) -> None:
        super().__init__(None, spec, slots, context)
        self.gpu = gpu_us * 1e-6
        rng = np.random.default_rng(0)
        self.table = (rng.standard_normal((64, slots, vocab)) * 3).astype(np.float32)
        self.calls = 0

    def _allocate(self, capacity: int) -> None:
        self.capacity = capacity

    def fit(self, need: int) -> None:
        self.capacity = max(self.capacity, need)

    def _logits(self, rows: int) -> np.ndarray:
        self.calls += 1
        return self.table[self.calls % len(self.table), :rows]

    def prefill(self, slots, lengths, chunks, prefixes):
        for _ in chunks:
            pass
        for slot, n in zip(slots, lengths):
            self.used[slot], self.lengths[slot] = True, n
        return self._logits(len(slots))

    def move(self, source: int, target: int) -> None:
        self.used[target], self.lengths[target] = True, self.lengths[source]
        self.release(source)

    def release(self, slot: int) -> None:
        self.used[slot], self.lengths[slot] = False, 0

    def _launch(self) -> Tuple[np.ndarray, float]:
        self.lengths[self.used] += 1
        return self._logits(self.top), time.perf_counter() + self.gpu

    def decode(self, ids, positions, slot=None, commit=True):
        logits, ready = self._launch()
        _wait_until(ready)
        return logits

    def decode_async(self, ids, positions) -> Step:
        logits, ready = self._launch()
        return Step(self, lambda: _wait_until(ready) or logits)


class InstantSelectCache(InstantCache):
    """:class:`InstantCache` with the tokens chosen on the "GPU" (``serve.device_select``), as the device cache's
    select engine does: a step's result is its ids, and :meth:`decode_ahead` launches the next step on them before
    the host has them. Steps queue as on one stream: each is ready ``gpu_us`` after the later of its launch and the
    step before it. The noise is drawn by :class:`~autoglm_build.runtime.device_select.DeviceSelect`'s own
    ``noise`` (each sampled row's generator, the Gumbel transform), only its upload left out; the ids are the
    sampler's candidate ids, cycled."""

    def __init__(self, spec, slots: int, context: int, vocab: int, gpu_us: float, candidates: np.ndarray,
                 k: int) -> None:
        super().__init__(spec, slots, context, vocab, gpu_us)
        self.candidates, self.ready, self.vocab = candidates, 0.0, vocab
        self.selector = None
        noise = [np.zeros((slots, k), np.float32) for _ in range(2)]
        self._select = SimpleNamespace(k=k, noise_host=noise, _turn=0, device=SimpleNamespace(upload=lambda *a: None),
                                       ptrs={"noise": 0}, put=lambda *a: None)

    def use_select(self, close: int, k: int) -> bool:
        self.selector = SimpleNamespace(k=k, put=self._select.put,
                                        noise=lambda n, rows: DeviceSelect.noise(self._select, n, rows))
        return True

    def _queue(self) -> float:
        self.lengths[self.used] += 1
        self.calls += 1
        self.ready = max(time.perf_counter(), self.ready) + self.gpu
        return self.ready

    def _ids(self, ready: float):
        ids = self.candidates[(self.calls * 7 + np.arange(self.top)) % len(self.candidates)].astype(np.int64)
        return lambda: _wait_until(ready) or ids

    def decode_async(self, ids, positions) -> Step:
        return Step(self, self._ids(self._queue()))

    def decode_ahead(self, positions) -> Step:
        self.in_flight -= 1  # as the device cache's: its launch may not wait for the step in flight
        try:
            ready = self._queue()
        finally:
            self.in_flight += 1
        return Step(self, self._ids(ready))


def _wait_until(deadline: float) -> None:
    left = deadline - time.perf_counter()
    if left > 0:
        time.sleep(left)


class InstantBackend:
    max_batch = context = prefill_chunk = prefill_batch = None

    def __init__(self, vocab: int, gpu_us: float, candidates=None, k: int = 64) -> None:
        self.vocab, self.gpu_us, self.candidates, self.k = vocab, gpu_us, candidates, k

    def describe(self) -> dict:
        return {"backend": "stand-in", "precision": "-"}

    def close(self) -> None:
        pass

    def kv_cache(self, spec, slots, context):
        if self.candidates is not None:
            return InstantSelectCache(spec, slots, context, self.vocab, self.gpu_us, self.candidates, self.k)
        return InstantCache(spec, slots, context, self.vocab, self.gpu_us)


def setup(rows: int, overlap: bool = False, gpu_us: float = 0.0, select: bool = False):
    cfg = load_config(TINY)
    tok = ChatTokenizer(tokenizer_for(cfg)[0], cfg.text.vocab_size)
    candidates = Sampler(tok, rows).ids if select else None
    backend = InstantBackend(cfg.text.vocab_size, gpu_us, candidates, cfg.serve.select_k)
    sched = Scheduler(backend, cfg, tok, max_batch=rows, queue_size=64, context=cfg.engine.context,
                      prefix_cache_bytes=0, overlap=overlap, device_select=select)
    prompts = [tok.chat_prompt([("user", [Segment(text=MESSAGE.format(i))])], False) for i in range(rows)]
    return sched, prompts


def per_step(sched: Scheduler, start: float, steps0: int) -> float:
    return (time.perf_counter() - start) / max(1, sched.steps - steps0) * 1e6


def timed_steps(sched: Scheduler) -> List[float]:
    """Wrap ``sched.step`` to add up the CPU time of its thread; returns the running total (one item)."""
    spent = [0.0]
    step = sched.step

    def timed() -> None:
        t = time.thread_time()
        step()
        spent[0] += time.thread_time() - t

    sched.step = timed
    return spent


def run_scheduler(a, **params) -> Tuple[float, float]:
    """(wall, CPU) microseconds per decode step, ``Scheduler.step`` in this thread, events into lists."""
    sched, prompts = setup(a.rows, a.overlap, a.gpu_us, getattr(a, "select", False))
    tokens = a.tokens
    events: Dict[int, List] = {}
    for i, prompt in enumerate(prompts):
        p = SamplingParams(max_tokens=tokens, ignore_eos=True, seed=i, **params)
        sched.submit(Request(prompt, p, emit=lambda e, i=i: events.setdefault(i, []).append(e)))
    sched.step()  # the prefill of every row
    start, steps0, cpu = time.perf_counter(), sched.steps, time.thread_time()
    sched.run_until_idle()
    return per_step(sched, start, steps0), (time.thread_time() - cpu) / (sched.steps - steps0) * 1e6


def run_server(a) -> Tuple[float, float]:
    """(wall, CPU of both threads) microseconds per decode step, the scheduler thread feeding the app's SSE
    chunks on an asyncio loop."""
    sched, prompts = setup(a.rows, a.overlap, a.gpu_us, getattr(a, "select", False))
    tokens = a.tokens
    state = SimpleNamespace(scheduler=sched)

    async def client(i: int, prompt) -> int:
        params = SamplingParams(max_tokens=tokens, temperature=0.7, seed=i, ignore_eos=True)
        events, request = submit(state, prompt, params, stream_interval(sched.cfg))  # as serve streams
        n = 0
        async for line in stream_chunks(events, request, "chatcmpl-x", 0, "m", True, False, True):
            n += len(line)
        return n

    async def main() -> Tuple[float, float]:
        spent = timed_steps(sched)
        sched.start()
        tasks = [asyncio.ensure_future(client(i, p)) for i, p in enumerate(prompts)]
        while sched.steps == 0:
            await asyncio.sleep(0)
        start, steps0, loop_cpu, sched_cpu = time.perf_counter(), sched.steps, time.thread_time(), spent[0]
        await asyncio.gather(*tasks)
        took = per_step(sched, start, steps0)
        cpu = time.thread_time() - loop_cpu + spent[0] - sched_cpu
        sched.stop()
        return took, cpu / (sched.steps - steps0) * 1e6

    return asyncio.run(main())


def serve_standin(a) -> None:
    """The child of :func:`run_http`: ``serve`` itself (uvicorn, the app, the scheduler thread) over the stand-in
    cache, on ``a.host``:``a.port``."""
    from autoglm_build.serve.app import ServerState
    from autoglm_build.serve.server import decode_overlap, serve

    sched, _ = setup(a.rows, decode_overlap(load_config(TINY)), a.gpu_us, a.select)
    tok = sched.tokenizer
    state = ServerState(cfg=sched.cfg, backend=sched.backend, tokenizer=tok, scheduler=sched,
                        model_ids=("autoglm-phone-9b",), stream_interval=stream_interval(sched.cfg))
    serve(state, a.host, a.port, "warning", announce=lambda _: None)


def run_http(a) -> Tuple[float, float]:
    """(wall, CPU) microseconds per decode step through HTTP: ``serve`` over the stand-in cache in a child
    process (uvicorn as ``serve`` runs it: uvloop and httptools where installed), ``a.rows`` concurrent streams
    from this process with ``serve_load.py``'s lean client, as on the GPU. CPU: the server process's, per step."""
    import json
    import os
    import tempfile
    import urllib.request

    from autoglm_build.serve.launch import serve_process

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serve_load import light_client

    args = ["--rows", str(a.rows), "--gpu-us", str(a.gpu_us)] + (["--select"] if a.select else [])
    env = {OVERLAP_ENV: "1" if a.overlap else "0"}  # the child's scheduler as this case's row says
    with tempfile.TemporaryDirectory(prefix="step-overhead-") as logs, \
            serve_process(args, Path(logs), env, program=(__file__, "--serve-standin")) as (url, proc, _):

        def stats() -> Tuple[int, float]:
            with urllib.request.urlopen(url + "/ready", timeout=5) as resp:
                steps = json.loads(resp.read())["decode_steps"]
            with open(f"/proc/{proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return steps, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        async def streams() -> None:
            await asyncio.gather(*(light_client(url, i, a.tokens, 60) for i in range(a.rows)))

        asyncio.run(streams())  # warm-up
        steps0, cpu0 = stats()
        start = time.perf_counter()
        for _ in range(5):
            asyncio.run(streams())
        wall = time.perf_counter() - start
        steps, cpu = stats()
    return wall / (steps - steps0) * 1e6, (cpu - cpu0) / (steps - steps0) * 1e6


CASES = {
    "scheduler": lambda a: run_scheduler(a, temperature=0.7),
    "server": run_server,
    "greedy": lambda a: run_scheduler(a, temperature=0.0),
    "penalties": lambda a: run_scheduler(a, temperature=0.7, top_p=0.85, frequency_penalty=0.2),
    "http": run_http,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="8", help="comma-separated row counts, e.g. 1,8")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--gpu-us", type=float, default=0.0, help="a decode step's logits come this long after its launch")
    ap.add_argument("--profile", choices=sorted(CASES),
                    help="cProfile one run of this case (stderr; the first --rows, overlap on) instead")
    ap.add_argument("--select", action="store_true",
                    help="the tokens chosen on the \"GPU\" (serve.device_select): steps launched ahead on their ids")
    ap.add_argument("--serve-standin", action="store_true", help=argparse.SUPPRESS)  # run_http's child
    ap.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)  # the child's address (serve_process)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_standin:
        serve_standin(SimpleNamespace(**{**vars(args), "rows": int(args.rows)}))
        return
    counts = [int(r) for r in args.rows.split(",") if r.strip()]
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(CASES[args.profile], SimpleNamespace(**{**vars(args), "rows": counts[0], "overlap": True}))
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
        return
    print(f"wall time per decode step, {args.tokens} tokens a row, us (median of {args.repeat}), each step's "
          f"logits {args.gpu_us:.0f} us after its launch; cpu: the CPU time of the scheduler's and the event "
          f"loop's threads, which contention changes less")
    print(f"  {'rows':>4} {'case':<10} {'overlap':<7} {'wall':>8} {'cpu':>8} {'min cpu':>8}")
    for rows in counts:
        for name, case in CASES.items():
            runs: Dict[bool, List[Tuple[float, float]]] = {False: [], True: []}
            for _ in range(args.repeat):  # off and on in turn: both see the same machine
                for overlap in runs:
                    runs[overlap].append(case(SimpleNamespace(**{**vars(args), "rows": rows, "overlap": overlap})))
            for overlap, got in runs.items():
                wall, cpu = statistics.median(r[0] for r in got), statistics.median(r[1] for r in got)
                print(f"  {rows:>4} {name:<10} {'on' if overlap else 'off':<7} {wall:8.0f} {cpu:8.0f} "
                      f"{min(r[1] for r in got):8.0f}", flush=True)


if __name__ == "__main__":
    main()
