"""Served greedy generations that the KV cache's device half must reproduce, and what crosses to the host.

:func:`scenario` runs, on one backend of a workdir (embed, decoder and vision at one precision), the same
requests through the scheduler as the server does: text prompts alone, together at ``max_batch`` 8 and
at ``max_batch`` 2 (rows join, leave and move), and phone-agent steps with the prefix cache (a long system
prompt, a screenshot's embeddings from the vision engine, a history; the later steps hit the first one's
blocks, two of them at once). It returns the tokens of each case, the prefix cache's counters and, for each
decode step, the bytes each copy kind moved (the device cache's own count, over every GPU it spans, and the
fake CUDA runtime's where it runs under tests/engine/fake_trt), the context rebinds and the cache's size.
``devices`` places the TensorRT engines on GPUs (``serve --devices``); ``cases`` runs some of the cases only.
A build without a vision engine runs the phone-agent steps without screenshots.

Imports on the GPU harness's Python 3.9 (no PIL, no transformers, no openai): the screenshots are the
build's vision samples, already preprocessed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from autoglm_build.config import BuildConfig
from autoglm_build.imaging import pack, unpack
from autoglm_build.manifest import Manifest
from autoglm_build.runtime.backends import Backend, open_backend
from autoglm_build.runtime.generation import Request, SamplingParams, Scheduler
from autoglm_build.runtime.text import ChatTokenizer, Prompt, Segment
from autoglm_build.stages.samples import load_samples

TEXTS = ["打开微信", "Open the settings app and turn on dark mode " * 3, "你是谁?", "Book a table for two at 7pm",
         "在小红书上搜索成都旅游攻略" * 4]
RULES = ("你是一个手机操作助手, 根据用户的任务和当前屏幕截图, 每一步只输出一个操作。先在 <think> 中说明你看到了什么, "
         "再在 <answer> 中给出操作。可用的操作: do(action=\"Launch\", app=\"应用名\"); do(action=\"Tap\", "
         "element=[x,y]); do(action=\"Type\", text=\"文字\"); do(action=\"Back\"); finish(message=\"结果\")。\n")
SYSTEM = "今天的日期是: 2026年11月27日\n" + RULES * 12  # about 2.4K characters: several 256-token blocks
MAX_TOKENS = 10


def _fake_cudart() -> Optional[Any]:
    """The fake CUDA runtime's handle where it stands in for libcudart (its copy log), else None."""
    try:
        from polygraphy.cuda import cuda
    except ImportError:
        return None
    handle = getattr(cuda.G_CUDA, "handle", None) if cuda.G_CUDA is not None else None
    return handle if hasattr(handle, "copies") else None


class StepLog:
    """Wraps a scheduler's ``cache.decode``, ``cache.decode_async`` (the steps launched ahead, whose result
    comes after the previous step's text) and ``cache.decode_ahead`` (with the select engine: launched on the ids
    the step in flight chooses): per committed decode step, what moved from its launch to its result (with a step
    launched ahead these windows overlap: the next step's launch falls in the one before) and what was rebound."""

    def __init__(self, scheduler: Scheduler, backend: Backend) -> None:
        self.cache, self.backend, self.steps = scheduler.cache, backend, []
        self.fake = _fake_cudart()
        self.prefilled = False
        self.calls = 0
        self.inside = False  # in a logged call: the calls it makes (decode <-> decode_async) are its own
        inner, launch, prefill = self.cache.decode, self.cache.decode_async, self.cache.prefill

        def prefilling(*args, **kwargs):
            self.prefilled = True
            return prefill(*args, **kwargs)

        def decode(ids, positions, slot=None, commit=True):
            if self.inside:
                return inner(ids, positions, slot, commit)
            done = self._begin(inner, ids, positions, slot, commit)
            return done(self._within(lambda: inner(ids, positions, slot, commit)))

        def decode_async(ids, positions):
            if self.inside:
                return launch(ids, positions)
            done = self._begin(inner, ids, positions, None, True)
            step = self._within(lambda: launch(ids, positions))
            return SimpleNamespace(result=lambda: done(step.result()), discard=step.discard)

        self.cache.decode, self.cache.decode_async, self.cache.prefill = decode, decode_async, prefilling
        ahead = getattr(self.cache, "decode_ahead", None)

        def decode_ahead(positions):
            done = self._begin(inner, None, positions, None, True)
            step = self._within(lambda: ahead(positions))
            return SimpleNamespace(result=lambda: done(step.result()), discard=step.discard)

        if ahead is not None:
            self.cache.decode_ahead = decode_ahead

    def _within(self, call):
        self.inside = True
        try:
            return call()
        finally:
            self.inside = False

    def _begin(self, inner, ids, positions, slot, commit):
        """Before a step: the isolation probe (1 in 4) and the counters; returns what logs the step's logits."""
        # the scheduler's isolation path (one row alone, nothing stored) on the highest used slot, first
        alone, used = None, [int(s) for s in np.flatnonzero(self.cache.used[:self.cache.top])]
        self.calls += 1
        if ids is not None and slot is None and commit and used and used[-1] > 0 and self.calls % 4 == 0:  # 1 in 4
            k = used[-1]
            alone = (k, np.array(inner(ids[k:k + 1], positions[k:k + 1], k, False), copy=True))
        fake_at = len(self.fake.copies) if self.fake is not None else 0
        device = getattr(self.cache, "device", None)
        before = dict(self.cache.traffic) if device is not None else {}
        rebinds = getattr(self.backend, "rebinds", 0)
        top = self.cache.top

        def done(out: np.ndarray) -> np.ndarray:
            capacity = self.cache.capacity
            step = {"top": top, "capacity": capacity, "slots": self.cache.slots, "rows": int(out.shape[0]),
                    "cache_bytes": top * self.cache.block_bytes(capacity), "logits_bytes": out.size * 4,
                    "rebinds": getattr(self.backend, "rebinds", 0) - rebinds, "commit": commit,
                    "after_prefill": self.prefilled, "probed": alone is not None}
            self.prefilled = False
            if device is not None:
                after = self.cache.traffic
                step["device"] = {k: after[k] - before[k] for k in before}
            if self.fake is not None:
                copies = self.fake.copies[fake_at:]
                step["fake"] = {kind: sum(n for k, n in copies if k == kind) for kind in ("h2d", "d2h", "d2d")}
                step["fake_largest"] = {kind: max([n for k, n in copies if k == kind] or [0])
                                        for kind in ("h2d", "d2h")}
            if alone is not None:  # the row alone gives the batched row's logits (the sampler's columns)
                k, row = alone
                lo, hi = getattr(self.cache, "logit_columns", None) or (0, out.shape[1])
                step["alone_max_diff"] = float(np.abs(row[0, lo:hi] - out[k, lo:hi]).max())
            self.steps.append(step)
            return out
        return done


def _generate(scheduler: Scheduler, prompts: List[Prompt], sampled: bool = False, first: int = 0) -> List[List[int]]:
    """Greedy with the phone agent's penalties; ``sampled``: seeded nucleus sampling, prompt ``i`` with seed
    ``100 + first + i``."""
    def params(i: int) -> SamplingParams:
        if sampled:
            return SamplingParams(temperature=0.8, top_p=0.9, presence_penalty=0.3, seed=100 + first + i,
                                  max_tokens=MAX_TOKENS, ignore_eos=True)
        return SamplingParams(temperature=0, top_p=0.85, frequency_penalty=0.2, max_tokens=MAX_TOKENS,
                              ignore_eos=True)
    reqs = [Request(p, params(i), emit=lambda e: None) for i, p in enumerate(prompts)]
    for req in reqs:
        scheduler.submit(req)
    scheduler.run_until_idle()
    return [r.token_ids for r in reqs]


def _screens(backend: Backend, cfg: BuildConfig, workdir: Path) -> List[Segment]:
    """Two screenshots' segments: the vision engine's/graph's embeddings (left on the GPU by TensorRT)."""
    path = workdir / "samples" / "vision.npz"
    if not path.is_file():  # a carried build may leave them out for size: say how to make them, not a traceback
        raise FileNotFoundError(f"{path}: the build's vision samples are missing (make them with `python "
                                f"scripts/samples_stage.py -c configs/autoglm-phone-tiny.yaml -w {workdir} -m vision`; "
                                "`scripts/device_full.sh devtests` does it first)")
    feeds = next(iter(load_samples(path).values()))  # one screenshot each
    merge = cfg.vision.spatial_merge_size
    out = []
    for image in [unpack(feed)[0] for feed in feeds[:2]]:
        embeds = backend.encode("vision", pack([image], merge), "image_embeds")
        key = hashlib.blake2b(image.pixel_values.tobytes(), digest_size=32).digest()
        out.append(Segment(media="image", embeds=embeds, grid=image.merged_grid(merge), key=key))
    return out


def _agent_prompts(tok: ChatTokenizer, screens: List[Segment]) -> List[Prompt]:
    """Step 1; step 2 after step 1's reply; two step-2 variants sent together (other screenshot, other text).
    Without ``screens`` (no vision engine), a line of text stands for each screenshot."""
    screens = screens or [Segment(text="[屏幕 1]"), Segment(text="[屏幕 2]")]
    system = [("system", [Segment(text=SYSTEM)])]
    first = system + [("user", [screens[0], Segment(text="打开蓝牙")])]
    history = system + [("user", [Segment(text="打开蓝牙")]),
                        ("assistant", [Segment(text="<think>设置</think><answer>do(action=\"Launch\", app=\"设置\")"
                                                    "</answer>")])]
    second = history + [("user", [screens[1], Segment(text="** Screen Info **")])]
    third = history + [("user", [screens[0], Segment(text="** Screen Info ** 2")])]
    return [tok.chat_prompt(turns, False) for turns in (first, second, third)]


CASES = ("solo", "batched", "joining", "agent")
# also "sampled" (seeded sampling alone and eight together), "shared" (two schedulers on the backend in turn: the
# first's tokens, again after the second was made, the second's), "limit" (rows run to a 40-token context's end)


def scenario(workdir: Path, backend_name: str, precision: str, devices: Optional[List[int]] = None,
             cases: Sequence[str] = CASES, graphs: bool = False, select: bool = False) -> Dict[str, Any]:
    """The cases above on one backend; tokens, prefix counters and per-step logs (``describe``: the backend's).
    ``graphs``: the schedulers run decode steps as CUDA graphs (``serve.cuda_graphs``); ``result["graphs"]``
    sums their caches' counts. ``select``: the tokens chosen on the GPU (``serve.device_select``; each scheduler's
    ``selecting`` in ``result["selecting"]``, its steps launched ahead in ``result["ahead"]``)."""
    from autoglm_build.calibration import tokenizer_for

    cfg = BuildConfig.model_validate(Manifest.load(workdir).config)
    tok = ChatTokenizer(tokenizer_for(cfg)[0], cfg.text.vocab_size)
    backend = open_backend(workdir, ["vision", "embed", "decoder"], backend_name, precision, optional=("vision",),
                           devices=devices)
    result: Dict[str, Any] = {"cache": None, "steps": {}, "describe": backend.describe()}
    made_all: List[Scheduler] = []
    try:
        def scheduler(max_batch: int, reuse: bool, context: int = cfg.engine.context) -> Scheduler:
            made = Scheduler(backend, cfg, tok, max_batch=max_batch, queue_size=64, context=context,
                             prefix_cache_bytes=None if reuse else 0, cuda_graphs=graphs, device_select=select)
            result["cache"] = type(made.cache).__name__
            result.setdefault("selecting", []).append(made.selecting)
            made_all.append(made)
            return made

        texts = [tok.chat_prompt([("user", [Segment(text=t)])], False) for t in TEXTS]
        if "solo" in cases:
            result["solo"] = [_generate(scheduler(8, False), [p])[0] for p in texts]
        for name, batch in (("batched", 8), ("joining", 2)):
            if name in cases:
                sched = scheduler(batch, False)
                log = StepLog(sched, backend)
                result[name] = _generate(sched, texts)
                result["steps"][name] = log.steps
        if "shared" in cases:  # schedulers sharing the backend in turn: each one's engines bound to its own cache
            first, second = scheduler(8, False), None
            result["shared"] = [_generate(first, texts[:3])]
            second = scheduler(8, False)
            result["shared"] += [_generate(first, texts[:3]), _generate(second, texts[:3])]
        if "limit" in cases:  # rows that run to the cache's last column (a 40-token context), with steps launched ahead
            short = scheduler(8, False, context=40)
            reqs = [Request(p, SamplingParams(temperature=0, max_tokens=40 - len(p.ids), ignore_eos=True),
                            emit=lambda e: None) for p in texts[:3]]
            for req in reqs:
                short.submit(req)
            short.run_until_idle()
            result["limit"] = {"generated": [len(r.token_ids) for r in reqs], "wanted": [40 - len(p.ids) for p in
                                                                                       texts[:3]],
                               "fallbacks": short.fallbacks, "ahead": short.overlapped}
        if "sampled" in cases:
            result["sampled_solo"] = [_generate(scheduler(8, False), [p], sampled=True, first=i)[0]
                                      for i, p in enumerate(texts)]
            result["sampled"] = _generate(scheduler(8, False), texts, sampled=True)
        if "agent" not in cases:
            return result
        screens = _screens(backend, cfg, workdir) if "vision" in backend.parts else []
        result["screens_on_device"] = [type(s.embeds).__name__ for s in screens]
        prompts = _agent_prompts(tok, screens)
        result["agent_alone"] = [_generate(scheduler(8, False), [p])[0] for p in prompts]
        sched = scheduler(8, True)
        log = StepLog(sched, backend)
        result["agent"] = _generate(sched, prompts[:1]) + _generate(sched, prompts[1:])
        result["steps"]["agent"] = log.steps
        result["prefix"] = sched.prefix.stats()
        result["prompt_tokens"] = [len(p.ids) for p in prompts]
    finally:
        result["ahead"] = sum(m.overlapped for m in made_all)
        counts = [m.cache.graphs.describe() for m in made_all if getattr(m.cache, "graphs", None) is not None]
        result["graphs"] = {k: sum(c[k] for c in counts) for k in counts[0]} if counts else None
        backend.close()
    return result
