"""Generation over the exported graphs: batched prefill and decode with the KV cache.

A :class:`Scheduler` owns the backend and runs every model call on one thread (TensorRT contexts
are not thread-safe, and one thread keeps the GPU's work in order). It does continuous batching:

1. New requests (up to the free rows of ``max_batch``) are prefilled together: their prompts are
   left-padded to one length, embedded by the ``embed`` graph, image/audio embeddings spliced in at
   their placeholder positions, and run through the decoder's prefill phase.
2. Their caches join the running batch's: the shorter side is left-padded (masked out) so that all
   rows end at the same column, which is where the next token goes.
3. One decode step for all rows at a time; rows that finish (stop token, stop string, max_tokens)
   or whose client went away leave the batch, and columns no row uses any more are dropped, so the
   cache is never longer than the longest row.

Positions are per row (GLM's 3-part rotary positions, so images keep their 2-D layout), which is
why left padding changes nothing a row computes: padded keys are masked and positions skip them.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence

import numpy as np

from autoglm_build.config import BuildConfig
from autoglm_build.runtime.backends import Backend
from autoglm_build.runtime.text import ChatTokenizer, Detokenizer, Prompt, StopMatcher

Event = Dict[str, Any]


class QueueFull(Exception):
    """Every batch row is busy and the waiting queue is at its bound."""


class SchedulerStopped(Exception):
    """The server is shutting down and takes no new requests."""


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: Sequence[str] = ()
    thinking_budget: Optional[int] = None  # reasoning tokens before </think> is forced
    ignore_eos: bool = False  # benchmarks: always generate max_tokens
    frequency_penalty: float = 0.0  # OpenAI's: minus penalty x count of each id generated so far
    presence_penalty: float = 0.0  # OpenAI's: minus penalty for each id generated at least once
    skip_special_tokens: bool = True  # vLLM's default: <think>, <answer>, ... never in the text


@dataclass
class Request:
    """One generation: its prompt, parameters, and where its events go.

    ``emit`` receives, from the scheduler thread, ``{"type": "delta", "reasoning": str, "content":
    str}`` events, then one ``{"type": "done", "finish_reason": ..., "usage": {...}}`` or
    ``{"type": "error", "message": ...}``.
    """

    prompt: Prompt
    params: SamplingParams
    emit: Callable[[Event], None]
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    first_token: Optional[float] = None
    # generation state (scheduler thread only)
    token_ids: List[int] = field(default_factory=list)
    reasoning_tokens: int = 0
    thinking: bool = False
    rng: Any = None

    @property
    def generated(self) -> int:
        return len(self.token_ids)

    def cancel(self) -> None:
        """Called from any thread when the client goes away; the row leaves at the next step."""
        self.cancelled = True


_ids = itertools.count(1)


class _Row:
    """A request in the running batch, with its text state."""

    def __init__(self, req: Request, tokenizer: ChatTokenizer) -> None:
        self.req = req
        self.reasoning = Detokenizer(tokenizer, req.params.skip_special_tokens)
        self.content = Detokenizer(tokenizer, req.params.skip_special_tokens)
        self.stops = StopMatcher(req.params.stop)
        self.next_position = req.prompt.next_position
        self.pending = 0  # the token sampled last, fed at the next decode step
        self.finish: Optional[str] = None


class Scheduler:
    """Continuous batching of :class:`Request` s over a backend's ``embed`` and ``decoder``.

    Args:
        backend: loaded graphs/engines (``embed`` and ``decoder``; ``vision``/``audio`` for media).
        cfg: the build config (decoder widths).
        tokenizer: the build's tokenizer.
        max_batch: decoder rows at once (capped by the backend's engines).
        queue_size: requests allowed to wait for a row.
        context: prompt + generated tokens per request (capped by the backend's engines).
        prefill_chunk: most prompt tokens per decoder call (default ``engine.prefill_chunk``, capped by
            the prefill profile); longer prompts are prefilled in chunks.
    """

    def __init__(self, backend: Backend, cfg: BuildConfig, tokenizer: ChatTokenizer, max_batch: int,
                 queue_size: int, context: int, prefill_chunk: Optional[int] = None) -> None:
        self.backend, self.cfg, self.tokenizer = backend, cfg, tokenizer
        self.max_batch = min(max_batch, backend.max_batch or max_batch)
        self.context = min(context, backend.context or context)
        chunk = prefill_chunk or cfg.engine.prefill_tokens
        self.prefill_chunk = min(chunk, getattr(backend, "prefill_chunk", None) or chunk)
        self.prefill_tokens = 0
        self.queue_size = queue_size
        self.layers = range(cfg.text.num_hidden_layers)
        self.waiting: Deque[Request] = collections.deque()
        self.rows: List[_Row] = []
        self.cache: Dict[str, np.ndarray] = {}
        self.mask = np.zeros((0, 0), np.int64)
        self.lock = threading.Condition()
        self.thread: Optional[threading.Thread] = None
        self.accepting = True
        self.running = False
        self.steps = 0
        self.tokens = 0

    # ---- any thread -------------------------------------------------------------------------

    def submit(self, req: Request) -> None:
        with self.lock:
            if not self.accepting:
                raise SchedulerStopped()
            if len(self.waiting) >= self.queue_size + max(0, self.max_batch - len(self.rows)):
                raise QueueFull()
            self.waiting.append(req)
            self.lock.notify()

    def stats(self) -> Dict[str, int]:
        with self.lock:
            return {"active": len(self.rows), "waiting": len(self.waiting), "max_batch": self.max_batch,
                    "queue_size": self.queue_size, "context": self.context, "prefill_chunk": self.prefill_chunk,
                    "decode_steps": self.steps, "tokens": self.tokens, "prefill_tokens": self.prefill_tokens}

    def start(self) -> None:
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="autoglm-scheduler", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Refuse new requests, finish the running and waiting ones, then end the thread."""
        with self.lock:
            self.accepting = False
            self.running = False
            self.lock.notify()
        if self.thread is not None:
            self.thread.join()

    # ---- scheduler thread -------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.lock:
                while self.running and not self.waiting and not self.rows:
                    self.lock.wait()
                if not self.running and not self.waiting and not self.rows:
                    return
            self.step()

    def run_until_idle(self) -> None:
        """Run steps in the calling thread until nothing is waiting or running (benchmarks, tests)."""
        while self.waiting or self.rows:
            self.step()

    def step(self) -> None:
        """Admit waiting requests (one batched prefill), then one decode step for every row."""
        admitted: List[Request] = []
        try:
            admitted = self._admit()
            if admitted:
                self._prefill(admitted)
            elif self.rows:
                self._decode()
        except Exception as exc:  # a backend failure ends the affected requests, not the server
            message = f"generation failed: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            affected = {id(r.req): r.req for r in self.rows}
            affected.update({id(r): r for r in admitted})  # a failed prefill's requests are in no row yet
            for req in affected.values():
                req.emit({"type": "error", "message": message})
            self.rows, self.cache, self.mask = [], {}, np.zeros((0, 0), np.int64)

    def _admit(self) -> List[Request]:
        with self.lock:
            free = self.max_batch - len(self.rows)
            out = []
            while self.waiting and len(out) < free:
                req = self.waiting.popleft()
                if not req.cancelled:
                    out.append(req)
            return out

    def _embed(self, ids: np.ndarray, phase: str) -> np.ndarray:
        return self.backend.run("embed", {"input_ids": ids}, phase)["inputs_embeds"]

    def _decoder(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: Dict[str, np.ndarray],
                 phase: str) -> Dict[str, np.ndarray]:
        feed = {"inputs_embeds": embeds.astype(np.float32, copy=False), "attention_mask": mask,
                "position_ids": positions}
        feed.update(past)
        return self.backend.run("decoder", feed, phase)

    def _prefill(self, reqs: List[Request]) -> None:
        """One batched prefill of the admitted prompts (left-padded to one length), in chunks of at most
        ``prefill_chunk`` tokens: each chunk attends to the cache the earlier chunks wrote."""
        t = self.cfg.text
        length = max(len(r.prompt.ids) for r in reqs)
        ids = np.zeros((len(reqs), length), np.int64)
        mask = np.zeros((len(reqs), length), np.int64)
        positions = np.zeros((len(reqs), 3, length), np.int64)
        for k, req in enumerate(reqs):
            n = len(req.prompt.ids)
            ids[k, length - n:] = req.prompt.ids
            mask[k, length - n:] = 1
            positions[k, :, length - n:] = req.prompt.positions
        past = {f"past_{kind}.{i}": np.zeros((len(reqs), t.num_key_value_heads, 0, t.head_dim), np.float32)
                for i in self.layers for kind in ("key", "value")}
        for start in range(0, length, self.prefill_chunk):
            end = min(length, start + self.prefill_chunk)
            embeds = self._embed(ids[:, start:end], "prefill")
            for k, req in enumerate(reqs):
                offset = length - len(req.prompt.ids)
                for at, media in req.prompt.splices:
                    lo, hi = max(start, offset + at), min(end, offset + at + len(media))
                    if lo < hi:
                        embeds[k, lo - start:hi - start] = media[lo - offset - at:hi - offset - at]
            out = self._decoder(embeds, mask[:, :end], positions[:, :, start:end], past, "prefill")
            past = {f"past_{kind}.{i}": out[f"present_{kind}.{i}"] for i in self.layers for kind in ("key", "value")}
        self.prefill_tokens += int(mask.sum())
        rows = [_Row(req, self.tokenizer) for req in reqs]
        now = time.perf_counter()
        for row in rows:
            row.req.thinking = row.req.prompt.thinking
            row.req.rng = np.random.default_rng(row.req.params.seed)
            row.req.first_token = now
        cache = {f"{kind}.{i}": out[f"present_{kind}.{i}"] for i in self.layers for kind in ("key", "value")}
        self._join(rows, cache, mask)
        self._sample(out["logits"], rows)
        self._retire()

    def _join(self, rows: List[_Row], cache: Dict[str, np.ndarray], mask: np.ndarray) -> None:
        """Append rows whose caches end at the same column as the running batch's (left-padding the shorter)."""
        if not self.rows:
            self.rows, self.cache, self.mask = rows, cache, mask
            return
        old, new = self.mask.shape[1], mask.shape[1]
        width = max(old, new)

        def pad(a: np.ndarray, axis: int) -> np.ndarray:
            extra = width - a.shape[axis]
            if not extra:
                return a
            widths = [(0, 0)] * a.ndim
            widths[axis] = (extra, 0)
            return np.pad(a, widths)

        self.mask = np.concatenate([pad(self.mask, 1), pad(mask, 1)], axis=0)
        self.cache = {k: np.concatenate([pad(v, 2), pad(cache[k], 2)], axis=0) for k, v in self.cache.items()}
        self.rows = self.rows + rows

    def _decode(self) -> None:
        self._retire()  # rows whose client left since the last step
        if not self.rows:
            return
        batch = len(self.rows)
        ids = np.array([[r.pending] for r in self.rows], np.int64)
        self.mask = np.concatenate([self.mask, np.ones((batch, 1), np.int64)], axis=1)
        positions = np.repeat(np.array([[r.next_position] for r in self.rows], np.int64)[:, None, :], 3, axis=1)
        past = {f"past_{k}": v for k, v in self.cache.items()}
        out = self._decoder(self._embed(ids, "decode"), self.mask, positions, past, "decode")
        self.cache = {k: out[f"present_{k}"] for k in self.cache}
        for row in self.rows:
            row.next_position += 1
        self.steps += 1
        self._sample(out["logits"], self.rows)
        self._retire()

    def _retire(self) -> None:
        """Rows that finished or whose client left leave the batch; columns no row attends to go."""
        keep = [k for k, r in enumerate(self.rows) if r.finish is None and not r.req.cancelled]
        if len(keep) != len(self.rows):
            index = np.array(keep, np.int64)
            self.rows = [self.rows[k] for k in keep]
            self.mask = self.mask[index]
            self.cache = {k: v[index] for k, v in self.cache.items()}
        if self.rows:
            used = np.flatnonzero(self.mask.any(axis=0))
            first = int(used[0]) if used.size else self.mask.shape[1]
            if first:
                self.mask = self.mask[:, first:]
                self.cache = {k: v[:, :, first:] for k, v in self.cache.items()}

    # ---- sampling ---------------------------------------------------------------------------

    def _sample(self, logits: np.ndarray, rows: List[_Row]) -> None:
        tok = self.tokenizer
        close = tok.ids["</think>"]
        logits = logits.reshape(len(rows), -1, logits.shape[-1])[:, -1].astype(np.float64)
        for k, row in enumerate(rows):
            req, params = row.req, row.req.params
            if req.cancelled:
                continue
            budget = params.thinking_budget if params.thinking_budget is not None else params.max_tokens // 2
            if req.thinking and req.reasoning_tokens >= budget:
                token = close  # thinking budget spent: close the span so an answer follows
            else:
                allowed = tok.allowed.copy()
                allowed[close] = req.thinking
                if params.ignore_eos:
                    allowed[list(tok.stop_ids)] = False
                scores = apply_penalties(logits[k], req.token_ids, params.frequency_penalty, params.presence_penalty)
                token = _pick(scores, allowed, params, req.rng)
            self._accept(row, token)

    def _accept(self, row: _Row, token: int) -> None:
        req, tok = row.req, self.tokenizer
        req.token_ids.append(token)
        self.tokens += 1
        row.pending = token
        reasoning = content = ""
        if token in tok.stop_ids and not req.params.ignore_eos:
            row.finish = "stop"
        elif req.thinking:
            if token == tok.ids["</think>"]:
                req.thinking = False
            else:
                req.reasoning_tokens += 1
                reasoning = row.reasoning.push(token)
        else:
            text, hit = row.stops.feed(row.content.push(token))
            content = text
            if hit:
                row.finish = "stop"
        if row.finish is None and req.generated >= req.params.max_tokens:
            row.finish = "length"
        if row.finish is not None:
            content += row.stops.flush() if row.finish == "length" else ""
        if reasoning or content:
            req.emit({"type": "delta", "reasoning": reasoning, "content": content})
        if row.finish is not None:
            prompt = len(req.prompt.ids)
            media = req.prompt.media_tokens
            req.emit({"type": "done", "finish_reason": row.finish, "usage": {
                "prompt_tokens": prompt, "completion_tokens": req.generated, "total_tokens": prompt + req.generated,
                "prompt_tokens_details": {"image_tokens": media.get("image", 0), "audio_tokens": media.get("audio", 0)},
                "completion_tokens_details": {"reasoning_tokens": req.reasoning_tokens}}})


def apply_penalties(logits: np.ndarray, generated: Sequence[int], frequency: float, presence: float) -> np.ndarray:
    """OpenAI's frequency and presence penalties over the tokens generated so far:
    ``logits[j] - count[j] * frequency - (count[j] > 0) * presence``."""
    if not generated or (frequency == 0 and presence == 0):
        return logits
    counts = np.bincount(np.asarray(generated, dtype=np.int64), minlength=len(logits))[: len(logits)]
    return logits - frequency * counts - presence * (counts > 0)


def _pick(logits: np.ndarray, allowed: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Greedy at temperature 0, else nucleus sampling over the allowed ids."""
    masked = np.where(allowed, logits, -np.inf)
    if params.temperature <= 0:
        return int(np.argmax(masked))
    scaled = masked / params.temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs)
        cumulative = np.cumsum(probs[order])
        cut = int(np.searchsorted(cumulative, params.top_p)) + 1
        keep = order[:cut]
        probs = np.zeros_like(probs)
        probs[keep] = 1.0
        probs *= np.exp(scaled - scaled.max())
        probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))
