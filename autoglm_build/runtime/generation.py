"""Generation over the exported graphs: batched prefill and decode with the KV cache.

A :class:`Scheduler` owns the backend and runs every model call on one thread (TensorRT contexts
are not thread-safe, and one thread keeps the GPU's work in order). It does continuous batching:

1. New requests (up to the free rows of ``max_batch``; in groups of at most ``prefill_batch``, the
   prefill profile's rows, which a long-context engine keeps below the decode profile's) are prefilled
   together: their prompts are left-padded to one length, embedded by the ``embed`` graph, image/audio
   embeddings spliced in at their placeholder positions, and run through the decoder's prefill phase.
2. Each row's cache is copied into a free slot of the backend's :class:`~.kv_cache.KVCache`
   (one preallocated slot per batch row): no running row is copied when a row joins or leaves.
3. One decode step for all rows at a time; one vectorized sampling pass over the batch's logits
   (temperature, top-p, penalties; each seeded request draws from its own generator, so what it
   samples does not depend on its neighbours). Rows that finish (stop token, stop string, max_tokens)
   or whose client went away free their slot.
4. With ``overlap`` (``serve.overlap``) on a cache whose steps run asynchronously (TensorRT's, on the GPU),
   the next decode step is launched as soon as the tokens are picked and their cheap bookkeeping is done
   (what the next pick reads), before this step's text work (detokenizing, stop strings, events): the
   engines run while the host streams the text. (A host cache computes a step before it returns: there,
   launching ahead would only hold the text back while the decoder runs, so it is not done.) It is
   launched only when it is the step the serial order would run next (no row finished or left, nobody to
   admit, no hole to close). A row that a stop string ends meanwhile is in that step: its result is
   dropped and the row leaves afterwards (one step of compute lost, its cache column a real token's).
   Every cache call that changes the cache waits until the step's result is taken (the cache refuses
   it before); so do admission, retiring and errors. The tokens and text are those of the serial order.
5. With ``device_select`` (``serve.device_select``; the device cache on one GPU) each decode step's tokens are
   chosen on the GPU by the select engine (:mod:`~.device_select`) right after the decoder, into the ids the next
   step's embed engine reads; only those ids come back (4 bytes a row). With ``overlap`` the next step is then
   launched as soon as this one is (at most two in flight), on those ids, under the same rule as item 4; its
   result is taken after this one's, whose bookkeeping and text run while the GPU works. The GPU also moves each
   row's penalty counts and thinking state with its tokens (what the host's bookkeeping does), so a step launched
   before the host saw the previous token selects under the right rules; the host sends a row's tables only when
   its slot changes hands. A prefill's first token is still the host sampler's. Greedy rows pick what the host
   picks (FP32 penalties instead of FP64, and TensorRT's order among exactly equal logits, aside); a sampled row
   draws by Gumbel-max with noise from its own generator among its ``select_k`` most probable ids, so a seeded
   request repeats its tokens whatever shares its batch, but they are not the host sampler's.

Positions are per row (GLM's 3-part rotary positions, so images keep their 2-D layout), which is
why padding changes nothing a row computes: padded keys are masked and positions skip them.

A failure is the row's own where it can be: a request whose preparation, sampling or event delivery
raises ends alone; when a batched model call raises, each row is tried alone (its cache untouched),
the rows that fail alone end with the error and the others go on, computing what they would have
computed alone.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import AbstractSet, Any, Callable, Deque, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from autoglm_build.config import BuildConfig
from autoglm_build.runtime.backends import Backend
from autoglm_build.runtime.device_select import GumbelNoise
from autoglm_build.runtime.kv_cache import CacheSpec, Chunk, KVCache, Splice, Step
from autoglm_build.runtime.prefix_cache import BLOCK_TOKENS, PrefixCache, Reuse
from autoglm_build.runtime.text import ChatTokenizer, Detokenizer, Prompt, StopMatcher

Event = Dict[str, Any]
log = logging.getLogger("autoglm_build.serve")
LOG_EVERY = 60.0  # seconds between the prefix cache's summary lines


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
    draws: Any = None  # the host sampler's uniform numbers from ``rng`` (:class:`UniformDraws`), made with it
    noise: Any = None  # the select engine's Gumbel numbers from ``rng`` (device_select.GumbelNoise), made at first use
    reuse: Optional[Reuse] = None  # the prefix cache's plan while it is prefilled

    @property
    def generated(self) -> int:
        return len(self.token_ids)

    def cancel(self) -> None:
        """Called from any thread when the client goes away; the row leaves at the next step."""
        self.cancelled = True


_ids = itertools.count(1)


class UniformDraws:
    """A sampled request's uniform numbers for the host sampler's draw (one a step), from its own generator,
    :attr:`BLOCK` at a time: ``random(32)`` fills an array in order, one double each, so its numbers are those of
    32 ``random()`` calls in a row, for the price of one call (a ``Generator.random()`` call per sampled row cost
    ~2-3 us a step, ~2 % of a tiny 8-row decode step on the dev CPU). The generator runs up to a block ahead of the
    numbers taken. Where the GPU chooses the tokens (``serve.device_select``) the host still samples a request's first
    token, after its prefill: that takes a block, and the select engine's Gumbel numbers
    (:class:`~.device_select.GumbelNoise`) come from the generator after it, the same ones each time."""

    BLOCK = 32

    def __init__(self, rng: Any) -> None:
        self.rng = rng
        self.block: List[float] = []
        self.at = 0

    def take(self) -> float:
        """The next number in [0, 1)."""
        if self.at == len(self.block):
            self.block, self.at = self.rng.random(self.BLOCK).tolist(), 0
        self.at += 1
        return self.block[self.at - 1]


class _Row:
    """A request in the running batch: its slot in the KV cache and its text state."""

    def __init__(self, req: Request, tokenizer: ChatTokenizer, slot: int) -> None:
        self.req = req
        self.slot = slot
        self.reasoning = Detokenizer(tokenizer, req.params.skip_special_tokens)
        self.content = Detokenizer(tokenizer, req.params.skip_special_tokens)
        self.stops = StopMatcher(req.params.stop)
        self.next_position = req.prompt.next_position
        self.pending = 0  # the token sampled last, fed at the next decode step
        self.finish: Optional[str] = None


def _failure(exc: BaseException) -> str:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"generation failed: {exc.__class__.__name__}: {first}"


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
        prefill_batch: most requests per prefill call (default ``engine.prefill_batch``, capped by the
            prefill profile's rows); more admitted at once are prefilled in groups of that many.
        prefix_cache_bytes: the prefix cache's budget (default ``serve.prefix_cache_mib``; 0: no reuse).
        prefix_block: tokens per prefix-cache block.
        overlap: launch each decode step before the previous step's text work where the cache's steps run
            asynchronously (default ``serve.overlap``; module docstring, item 4).
        cuda_graphs: decode steps as CUDA graphs where the cache can (the device cache on one GPU; default
            ``serve.cuda_graphs``).
        device_select: decode steps' tokens chosen on the GPU where the cache can (the device cache on one GPU;
            default ``serve.device_select``): module docstring, item 5.
    """

    def __init__(self, backend: Backend, cfg: BuildConfig, tokenizer: ChatTokenizer, max_batch: int,
                 queue_size: int, context: int, prefill_chunk: Optional[int] = None,
                 prefix_cache_bytes: Optional[int] = None, prefix_block: int = BLOCK_TOKENS,
                 prefill_batch: Optional[int] = None, overlap: Optional[bool] = None,
                 cuda_graphs: Optional[bool] = None, device_select: Optional[bool] = None) -> None:
        self.backend, self.cfg, self.tokenizer = backend, cfg, tokenizer
        self.max_batch = min(max_batch, backend.max_batch or max_batch)
        self.context = min(context, backend.context or context)
        chunk = prefill_chunk or cfg.engine.prefill_tokens
        self.prefill_chunk = min(chunk, getattr(backend, "prefill_chunk", None) or chunk)
        rows = min(prefill_batch or cfg.engine.prefill_rows, self.max_batch)
        self.prefill_batch = min(rows, getattr(backend, "prefill_batch", None) or rows)
        self.prefill_tokens = 0  # prompt tokens run through the decoder (reused ones are not)
        self.prefill_positions = 0  # decoder positions of prefill calls, padding included
        self.queue_size = queue_size
        spec = CacheSpec.of(cfg.text)
        make = getattr(backend, "kv_cache", None)  # a bare test double gets host arrays
        self.cache: KVCache = make(spec, self.max_batch, self.context) if make else \
            KVCache(backend, spec, self.max_batch, self.context)
        if (cfg.serve.cuda_graphs if cuda_graphs is None else cuda_graphs) and hasattr(self.cache, "use_graphs"):
            self.cache.use_graphs(True)
        budget = cfg.serve.prefix_cache_mib << 20 if prefix_cache_bytes is None else prefix_cache_bytes
        self.prefix = PrefixCache(self.cache, budget, prefix_block)
        self.sampler = Sampler(tokenizer, self.max_batch)
        self.cache.logit_columns = (int(self.sampler.ids[0]), int(self.sampler.ids[-1]) + 1)
        self.selecting = False  # tokens chosen on the GPU (device_select): the steps' results are ids
        if (cfg.serve.device_select if device_select is None else device_select) and hasattr(self.cache, "use_select"):
            self.selecting = self.cache.use_select(tokenizer.ids["</think>"], cfg.serve.select_k)
        self.dirty: set = set()  # slots whose rows' select tables the GPU does not hold yet (joined, moved)
        self._drawn: Dict[int, Any] = {}  # the step launched ahead's rows' generator states before its noise
        self.waiting: Deque[Request] = collections.deque()
        self.rows: List[_Row] = []
        self.lock = threading.Condition()
        self.thread: Optional[threading.Thread] = None
        self.accepting = True
        self.running = False
        self.overlap = cfg.serve.overlap if overlap is None else overlap
        self.flight: Optional[Step] = None  # the decode step launched ahead; while set, rows stay in the batch
        self.steps = 0
        self.overlapped = 0  # decode steps launched before the previous step's text work
        self.fallbacks = 0  # steps launched ahead whose launch or result raised (run again serially)
        self.tokens = 0
        self.logged = time.monotonic()
        # called on the scheduler's thread at the start of each step, before its engine calls (the server's
        # EventBridge.tick: the streams' chunks are written while the engine runs)
        self.tick: Optional[Callable[[], None]] = None
        self.tick_failures = 0

    # ---- any thread -------------------------------------------------------------------------

    def submit(self, req: Request) -> None:
        with self.lock:
            if not self.accepting:
                raise SchedulerStopped()
            if len(self.waiting) >= self.queue_size + max(0, self.max_batch - len(self.rows)):
                raise QueueFull()
            self.waiting.append(req)
            self.lock.notify()

    def stats(self) -> Dict[str, Any]:
        with self.lock:
            return {"active": len(self.rows), "waiting": len(self.waiting), "max_batch": self.max_batch,
                    "queue_size": self.queue_size, "context": self.context, "prefill_chunk": self.prefill_chunk,
                    "prefill_batch": self.prefill_batch, "overlap": self.overlapping,
                    "decode_steps": self.steps, "overlapped_steps": self.overlapped, "tokens": self.tokens,
                    "prefill_tokens": self.prefill_tokens,
                    "prefill_positions": self.prefill_positions, "prefix_cache": self.prefix.stats(),
                    "device_select": self.selecting,
                    "cuda_graphs": self.cache.graphs.describe() if self.graphing else None,
                    # the cache's own element type (the decoder's past_*: FP32 on ONNX Runtime's FP32 graph, FP16
                    # on the engines) and what one token's keys and values take in it
                    "kv_dtype": self.cache.dtype.name, "kv_bytes_per_token": self.cache.block_bytes(1)}

    @property
    def graphing(self) -> bool:
        """Whether decode steps run as CUDA graphs (``serve.cuda_graphs`` on a cache that can)."""
        return getattr(self.cache, "graphs", None) is not None

    @property
    def overlapping(self) -> bool:
        """Whether decode steps are launched ahead: asked for, and the cache's steps run asynchronously."""
        return self.overlap and self.cache.asynchronous

    def start(self, cpus: Optional[AbstractSet[int]] = None) -> None:
        """Start the scheduler's thread.

        Args:
            cpus: the cores it runs on (where ``os.sched_setaffinity`` exists; ONNX Runtime runs the graphs on this
                thread): the server's ``serve.cpu_affinity``. None: where the OS puts it.
        """
        self.running = True
        self.thread = threading.Thread(target=self._loop, args=(cpus,), name="autoglm-scheduler", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Refuse new requests, finish the running and waiting ones, then end the thread."""
        with self.lock:
            self.accepting = False
            self.running = False
            self.lock.notify()
        if self.thread is not None:
            self.thread.join()
        if self.prefix.enabled:
            log.info("%s", self.prefix.summary())

    # ---- scheduler thread -------------------------------------------------------------------

    def _loop(self, cpus: Optional[AbstractSet[int]] = None) -> None:
        if cpus and hasattr(os, "sched_setaffinity"):
            try:
                os.sched_setaffinity(0, cpus)  # 0: the calling thread
            except OSError as exc:  # a container that forbids it: serve where the OS puts the thread
                log.warning("serve.cpu_affinity: cannot pin the scheduler to CPU %s (%s)", sorted(cpus), exc)
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
        if self.tick is not None:
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the streams' pacing, not the step's work: say it (once), serve on
                if not self.tick_failures:
                    log.exception("the step's tick hook raised (said once); the steps run on")
                self.tick_failures += 1
        try:
            admitted = self._admit() if self.flight is None else []  # a step in flight is taken first
            if admitted:
                self._prefill(admitted)
            elif self.rows:
                self._decode()
        except Exception as exc:  # a bug outside the per-row paths: end what it touched, keep serving
            self._land()
            self._drawn = {}
            in_rows = {id(r.req) for r in self.rows}
            for req in admitted:
                if id(req) not in in_rows:
                    self._error(req, exc)
            for row in list(self.rows):
                self._end(row, exc)

    def _admit(self) -> List[Request]:
        with self.lock:
            free = self.max_batch - len(self.rows)
            out = []
            while self.waiting and len(out) < free:
                req = self.waiting.popleft()
                if not req.cancelled:
                    out.append(req)
            return out

    def _error(self, req: Request, exc: BaseException) -> None:
        """End a request with an error event (its client may be gone: a failing emit is dropped)."""
        try:
            req.emit({"type": "error", "message": _failure(exc)})
        except Exception:  # noqa: BLE001 - nobody left to tell
            pass

    def _end(self, row: _Row, exc: BaseException) -> None:
        """The row leaves the batch with an error; the others stay. While a step is in flight the row is
        in it: it leaves once the step's result is taken (its result dropped)."""
        if row in self.rows:
            if self.flight is None:
                self.rows.remove(row)
                self.cache.release(row.slot)
            else:
                row.finish = "error"
        self._error(row.req, exc)

    # ---- prefill ----------------------------------------------------------------------------

    def _prefill(self, reqs: List[Request]) -> None:
        """Prefill the admitted requests: those that start with held prefix blocks first (they run only
        their new tokens), then the others; a request that fails alone ends alone."""
        ready = []
        for req in reqs:
            try:
                req.rng = np.random.default_rng(req.params.seed)
                req.draws = UniformDraws(req.rng)
                req.thinking = req.prompt.thinking
                req.reuse = self.prefix.lookup(req.prompt)
                ready.append(req)
            except Exception as exc:  # e.g. a seed numpy refuses
                self._error(req, exc)
        try:
            for group in ([r for r in ready if r.reuse.tokens], [r for r in ready if not r.reuse.tokens]):
                for start in range(0, len(group), self.prefill_batch):  # the prefill profile's rows at most
                    self._prefill_group(group[start:start + self.prefill_batch])
            self._log_reuse(ready)
        finally:
            for req in ready:
                self.prefix.release(req.reuse)
                req.reuse = None

    def _log_reuse(self, reqs: List[Request]) -> None:
        """Each prefilled request's reuse (debug); the prefix cache's counters every ``LOG_EVERY`` s (info)."""
        if not self.prefix.enabled:
            return
        for req in reqs:
            log.debug("request %s: %d prompt tokens, %d reused from the prefix cache", req.id, len(req.prompt.ids),
                      req.reuse.tokens)
        if time.monotonic() - self.logged >= LOG_EVERY:
            self.logged = time.monotonic()
            log.info("%s", self.prefix.summary())

    def _prefill_group(self, reqs: List[Request]) -> None:
        """One batched prefill; when it raises, each request alone."""
        try:
            rows, logits = self._prefill_rows(reqs)
        except Exception:  # noqa: BLE001 - whose fault? each alone says
            rows, logits_list = [], []
            for req in reqs:
                try:
                    one, out = self._prefill_rows([req])
                except Exception as exc:
                    self._error(req, exc)
                    continue
                rows += one
                logits_list.append(out)
            if not rows:
                return
            logits = np.concatenate(logits_list)
        self._sample(logits, rows)
        self._retire()

    def _prefill_rows(self, reqs: List[Request]) -> Tuple[List[_Row], np.ndarray]:
        """One batched prefill of ``reqs`` into free slots (each from its reused prefix on); their rows join
        the batch and their prompts' new full blocks join the prefix cache."""
        slots = self.cache.free_slots()[:len(reqs)]
        lengths = [len(r.prompt.ids) for r in reqs]
        logits = self.cache.prefill(slots, lengths, self._chunks(reqs), [r.reuse.prefix for r in reqs])
        self.prefill_tokens += sum(n - r.reuse.tokens for n, r in zip(lengths, reqs))
        rows = [_Row(req, self.tokenizer, slot) for req, slot in zip(reqs, slots)]
        now = time.perf_counter()
        for row in rows:
            row.req.first_token = now
            self.sampler.join(row.slot)
            self.dirty.add(row.slot)
        self.rows += rows
        for row in rows:
            try:
                self.prefix.store(row.req.reuse, row.slot)
            except Exception:  # noqa: BLE001 - a cache that cannot keep a block serves the request anyway
                log.exception("prefix cache: storing blocks of request %s failed", row.req.id)
        return rows, logits

    def _chunks(self, reqs: List[Request]) -> Iterator[Chunk]:
        """The prompts' new tokens (after each one's reused prefix) left-padded to one length, with where
        their media go, in chunks of at most ``prefill_chunk`` tokens (the cache embeds them). Positions are the
        prompt's own (``ChatTokenizer.build``: GLM's ``get_rope_index``), those of the full prefill."""
        skip = [r.reuse.tokens if r.reuse is not None else 0 for r in reqs]
        length = max(len(r.prompt.ids) - p for r, p in zip(reqs, skip))
        ids = np.zeros((len(reqs), length), np.int64)
        mask = np.zeros((len(reqs), length), np.int64)
        positions = np.zeros((len(reqs), 3, length), np.int64)
        for k, (req, p) in enumerate(zip(reqs, skip)):
            n = len(req.prompt.ids) - p
            ids[k, length - n:] = req.prompt.ids[p:]
            mask[k, length - n:] = 1
            positions[k, :, length - n:] = req.prompt.positions[:, p:]
        for start in range(0, length, self.prefill_chunk):
            end = min(length, start + self.prefill_chunk)
            splices = []
            for k, (req, p) in enumerate(zip(reqs, skip)):
                offset = length - len(req.prompt.ids)  # column of prompt token 0 (negative: reused tokens)
                for at, media in req.prompt.splices:
                    lo, hi = max(start, offset + max(at, p)), min(end, offset + at + len(media))
                    if lo < hi:
                        splices.append(Splice(k, lo - start, media, lo - offset - at, hi - lo))
            self.prefill_positions += len(reqs) * (end - start)
            yield Chunk(ids[:, start:end], mask[:, :end], positions[:, :, start:end], splices)

    # ---- decode -----------------------------------------------------------------------------

    def _decode(self) -> None:
        """One decode step of every row: the one in flight, else one run now; its tokens; the next step
        launched (with ``overlap``, when it may be) before this one's text."""
        if self.selecting:
            self._decode_selected()
            return
        logits = self._land()
        if logits is None:  # nothing in flight (or it raised: the serial path runs it again)
            self._retire()  # rows that finished, or whose client left, since the last step
            if not self.rows:
                return
            logits = self._decode_serial()
            if logits is None:
                return
        for row in self.rows:
            row.next_position += 1
        self.steps += 1
        rows = [r for r in self.rows if r.finish is None]  # ended while the step ran: its result is dropped
        if rows:
            slots = [r.slot for r in rows]
            in_order = slots == list(range(len(logits)))  # every slot's row, in slot order: no copy to make
            self._sample(logits if in_order else logits[slots], rows, launch=self.overlapping)
        if self.flight is None:
            self._retire()

    def _decode_selected(self) -> None:
        """:meth:`_decode` with the tokens chosen on the GPU (module docstring, item 5): the step in flight, else
        one launched now; with ``overlap`` the next step launched at once, on the ids this one leaves on the GPU;
        then this step's ids, and each row's bookkeeping and text while the next one runs. A step whose launch or
        result raises is taken back with the one launched on it, the rows' generators are put back to before its
        noise, and the serial path runs it again: the same tokens."""
        flight, self.flight = self.flight, None
        drawn, self._drawn = self._drawn, {}
        tokens = None
        if flight is None:
            self._retire()
            if not self.rows:
                return
            try:
                drawn = self._prepare(self.rows)
                flight = self.cache.decode_async(*self._inputs(self.rows, self.cache.top))
            except Exception as exc:  # noqa: BLE001 - the serial path runs it again and says whose fault it is
                self._fell_back("launch", exc)
                tokens = self._again(drawn)
                if tokens is None:
                    return
        if tokens is None:
            if self.overlapping:
                self._launch_ahead()
            try:
                tokens = flight.result()
            except Exception as exc:  # noqa: BLE001 - taken back by the cache; the serial path runs it again
                self._fell_back("result", exc)
                ahead, self.flight, self._drawn = self.flight, None, {}
                if ahead is not None:
                    ahead.discard()  # launched on this step's ids: its columns are taken back too
                tokens = self._again(drawn)
                if tokens is None:
                    return
        for row in self.rows:
            row.next_position += 1
        self.steps += 1
        self._take([(r, int(tokens[r.slot])) for r in self.rows if r.finish is None and not r.req.cancelled])
        if self.flight is None:
            self._retire()

    def _again(self, drawn: Dict[int, Any]) -> Optional[np.ndarray]:
        """After a step that failed: the rows' generators as before its noise, every row's tables sent again
        (the GPU's may hold the step's moves), the step run serially."""
        self._restore(drawn)
        return self._decode_serial()

    def _restore(self, drawn: Dict[int, Any]) -> None:
        """The running rows' noise streams (and generators) as :meth:`_prepare` found them (``drawn``: its return)."""
        for row in self.rows:
            if id(row) in drawn:
                row.req.noise.rewind(drawn[id(row)])

    def _prepare(self, rows: List[_Row]) -> Dict[int, Any]:
        """Before a decode step with the select engine: the tables of rows whose slots changed hands go up, and
        the step's noise (each sampled row's own stream, :class:`~.device_select.GumbelNoise`, from its generator).
        Returns each drawing row's stream position from before the draw (a failed step is run again on the same
        noise)."""
        selector = self.cache.selector
        for row in rows:
            if row.slot in self.dirty:
                selector.put(row.slot, *self.sampler.device_row(row, self.cache.vocab), row.pending)
        self.dirty.clear()
        drawing = [r for r in rows if r.req.params.temperature > 0 and r.finish is None]
        for row in drawing:
            if row.req.noise is None:
                row.req.noise = GumbelNoise(row.req.rng, selector.k)
        drawn = {id(r): r.req.noise.mark() for r in drawing}
        try:
            selector.noise(self.cache.top, [(r.slot, r.req.noise) for r in drawing])
        except BaseException:  # nothing launched: the streams as they were, so the step runs again on this noise
            self._restore(drawn)
            raise
        return drawn

    def _launch_ahead(self) -> None:
        """Launch the next decode step on the ids the step in flight chooses, before the host has them, if it is
        the step the serial order runs next (:meth:`_launch`'s rule) and the cache has a column for it (a row at
        the context's end). A launch that raises is taken back (the rows' generators too) and left to the serial
        path."""
        if not self._serial_order_next():
            return
        # a row at the context's last column ends with the step in flight: the cache has no column for a next one
        if int(self.cache.lengths[self.cache.used].max(initial=0)) + 1 > self.cache.context - 1:
            return
        drawn: Dict[int, Any] = {}
        try:
            drawn = self._prepare(self.rows)
            self.flight = self.cache.decode_ahead(self._positions(self.rows, self.cache.top, ahead=1))
            self._drawn = drawn
        except Exception as exc:  # noqa: BLE001 - see above
            self._fell_back("launch", exc)
            self._restore(drawn)
            self.dirty.update(r.slot for r in self.rows)  # its engine may have moved the GPU's tables
            return
        self.overlapped += 1

    def _decode_serial(self) -> Optional[np.ndarray]:
        """One decode step of every row, waited for; when it raises, each row alone, and the rows left once
        more. None: no row is left."""
        try:
            return self._decode_step()
        except Exception:  # noqa: BLE001 - whose fault? each row alone says
            self._isolate()
            if not self.rows:
                return None
            try:
                return self._decode_step()
            except Exception as exc:  # fails with every row that works alone: not one row's fault
                for row in list(self.rows):
                    self._end(row, exc)
                return None

    def _serial_order_next(self) -> bool:
        """Whether the step the serial order runs next is every row's decode step as the rows lie: none finished,
        left or failed, nobody waits for a free row, and no row would move down into a free slot."""
        if any(r.finish is not None or r.req.cancelled for r in self.rows) or self.cache.top > len(self.rows):
            return False
        return not (self.waiting and len(self.rows) < self.max_batch)

    def _launch(self) -> None:
        """Launch the next decode step ahead of this step's text, if it is the step the serial order runs next:
        every row goes on (none finished, left or failed), nobody waits for a free row, and no row would
        move down into a free slot. A launch that raises is left to the serial path, which runs it again."""
        if not self._serial_order_next():
            return
        try:
            self.flight = self.cache.decode_async(*self._inputs(self.rows, self.cache.top))
        except Exception as exc:  # noqa: BLE001 - the serial path runs the step again and says whose fault it is
            self._fell_back("launch", exc)
            return
        self.overlapped += 1

    def _land(self) -> Optional[np.ndarray]:
        """The logits of the step in flight, once it is done. None: no step in flight, or it raised (the
        cache took the step back; the serial path runs it again)."""
        flight, self.flight = self.flight, None
        if flight is None:
            return None
        try:
            return flight.result()
        except Exception as exc:  # noqa: BLE001 - see above
            self._fell_back("result", exc)
            return None

    def _fell_back(self, what: str, exc: BaseException) -> None:
        """Say (once per scheduler) that a step launched ahead failed and ran again serially."""
        if not self.fallbacks:
            log.warning("decode overlap: a step's %s raised (%s); it ran again serially", what, _failure(exc))
        self.fallbacks += 1

    def _inputs(self, rows: List[_Row], top: int) -> Tuple[np.ndarray, np.ndarray]:
        """The step's ids and positions per slot."""
        ids = np.zeros((top, 1), np.int64)
        for row in rows:
            ids[row.slot, 0] = row.pending
        return ids, self._positions(rows, top)

    @staticmethod
    def _positions(rows: List[_Row], top: int, ahead: int = 0) -> np.ndarray:
        """The step's positions per slot; ``ahead``: steps launched before this one whose tokens the host has not
        taken yet (their positions come first; a step launched ahead takes its ids on the GPU, so only these)."""
        positions = np.zeros((top, 3, 1), np.int64)
        for row in rows:
            positions[row.slot, :, 0] = row.next_position + ahead
        return positions

    def _decode_step(self) -> np.ndarray:
        ids, positions = self._inputs(self.rows, self.cache.top)
        if self.selecting:  # a serial step after a failure: the GPU's tables may hold a step taken back
            self.dirty.update(r.slot for r in self.rows)
            drawn = self._prepare(self.rows)
            try:
                return self.cache.decode(ids, positions)
            except Exception:  # run again (after isolating the rows that fail alone) on the same noise
                self._restore(drawn)
                raise
        return self.cache.decode(ids, positions)

    def _isolate(self) -> None:
        """After a batched decode step raised: each row runs alone (nothing stored); those that fail leave."""
        for row in list(self.rows):
            ids = np.array([[row.pending]], np.int64)
            positions = np.full((1, 3, 1), row.next_position, np.int64)
            try:
                self.cache.decode(ids, positions, slot=row.slot, commit=False)
            except Exception as exc:
                self._end(row, exc)

    def _retire(self) -> None:
        """Rows that finished or whose client left free their slots. With nobody waiting for a slot, rows
        in the highest slots move down into free ones so the next steps run fewer rows."""
        for row in [r for r in self.rows if r.finish is not None or r.req.cancelled]:
            self.rows.remove(row)
            self.cache.release(row.slot)
        if self.waiting or not self.rows or self.cache.top == len(self.rows):  # the rows fill slots 0..top: none moves
            return
        free = self.cache.free_slots()
        for row in sorted(self.rows, key=lambda r: -r.slot):
            if not free or free[0] > row.slot:
                break
            target = free.pop(0)
            self.cache.move(row.slot, target)
            self.sampler.move(row.slot, target)
            self.dirty.add(target)
            row.slot = target

    # ---- sampling ---------------------------------------------------------------------------

    def _sample(self, logits: np.ndarray, rows: List[_Row], launch: bool = False) -> None:
        """Pick each row's next token in one pass over the batch; a row whose own state makes that pass
        raise is tried alone and ends alone. Then each token's bookkeeping, and its text; with ``launch``
        the next decode step is launched between the two (:meth:`_launch`) when every row got its token."""
        live = [r for r in rows if not r.req.cancelled]
        index = [k for k, r in enumerate(rows) if not r.req.cancelled]
        try:
            tokens = self.sampler.pick(logits if len(index) == len(rows) else logits[index], live)
        except Exception:  # noqa: BLE001 - whose fault? each row alone says
            tokens = []
            for k, row in zip(index, live):
                try:
                    tokens += self.sampler.pick(logits[k:k + 1], [row])
                except Exception as exc:
                    tokens.append(None)
                    self._end(row, exc)
        self._take([(row, token) for row, token in zip(live, tokens) if token is not None],
                   launch=launch, every=len(rows))

    def _take(self, picked: List[Tuple[_Row, int]], launch: bool = False, every: int = 0) -> None:
        """Each picked token's bookkeeping (:meth:`_advance`), then its text (:meth:`_deliver`); a row whose own
        bookkeeping or delivery raises ends alone. With ``launch``, the next decode step is launched between the
        two (:meth:`_launch`) when all ``every`` rows took their tokens."""
        accepted = []
        for row, token in picked:
            try:
                accepted.append((row, token, self._advance(row, token)))
            except Exception as exc:
                self._end(row, exc)
        if launch and len(accepted) == every:
            self._launch()
        for row, token, kind in accepted:
            try:
                self._deliver(row, token, kind)
            except Exception as exc:  # e.g. its client's event loop is gone
                self._end(row, exc)

    def _advance(self, row: _Row, token: int) -> str:
        """The token's bookkeeping, all that the next pick reads: the ids and their counts, the thinking
        span, a stop id, ``max_tokens``. Returns its kind for :meth:`_deliver`: ``stop`` (a stop id),
        ``close`` (``</think>``), ``reasoning`` or ``content``."""
        req, tok = row.req, self.tokenizer
        req.token_ids.append(token)
        self.sampler.count(row.slot, token)
        self.tokens += 1
        row.pending = token
        if token in tok.stop_ids and not req.params.ignore_eos:
            kind = row.finish = "stop"
        elif not req.thinking:
            kind = "content"
        elif token == tok.ids["</think>"]:
            kind, req.thinking = "close", False
        else:
            kind = "reasoning"
            req.reasoning_tokens += 1
        if row.finish is None and req.generated >= req.params.max_tokens:
            row.finish = "length"
        return kind

    def _deliver(self, row: _Row, token: int, kind: str) -> None:
        """The token's text: detokenized, matched against the stop strings (a match ends the row, before
        ``max_tokens`` does), sent as a delta; then the done event if the row finished."""
        req = row.req
        reasoning = content = ""
        if kind == "reasoning":
            reasoning = row.reasoning.push(token)
        elif kind == "content":
            content, hit = row.stops.feed(row.content.push(token))
            if hit:
                row.finish = "stop"
        if row.finish == "length":
            content += row.stops.flush()
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


class _Batch(NamedTuple):
    """:meth:`Sampler._pick`'s view of its rows' parameters (:meth:`Sampler._batch`)."""

    params: Tuple[SamplingParams, ...]  # the objects these arrays were made from
    penalized: bool  # some row has a frequency or presence penalty
    frequency: np.ndarray
    presence: np.ndarray
    hot: np.ndarray  # the rows that sample (temperature > 0)
    divisor: np.ndarray  # (rows, 1) float32: each row's temperature, 1 for the greedy rows
    top_p: np.ndarray
    nucleus: np.ndarray  # the rows that sample within a top-p nucleus


#: columns per block of :meth:`Sampler._draw`'s two-level running sum
DRAW_BLOCK = 32
#: float32's least normal number: the divisor of a temperature below it (no subnormal arithmetic; greedy either way)
TINIEST = np.float32(np.finfo(np.float32).tiny)


class Sampler:
    """Next tokens for the rows of a batch in one pass over their logits: greedy at temperature 0, else
    nucleus sampling, after OpenAI's penalties, over the ids each row may produce. Each row draws one
    uniform number from its own generator (``Request.rng``, through ``Request.draws``), and only when it
    samples, against its own cumulative distribution (as ``Generator.choice`` does), so a seeded request
    samples the same tokens whatever rows share its batch. Rows are independent in every array operation here.

    Args:
        tokenizer: the ids never sampled (``allowed``), ``</think>`` and the stop ids.
        slots: batch rows; each keeps the counts of the ids it generated (the penalties).
    """

    def __init__(self, tokenizer: ChatTokenizer, slots: int) -> None:
        self.tok = tokenizer
        close, stops = tokenizer.ids["</think>"], sorted(tokenizer.stop_ids)
        # the work is over the ids some row may produce (the tiny vocabulary: 1,237 of 4,096 rows)
        candidates = tokenizer.allowed.copy()
        candidates[[close] + stops] = True
        self.ids = np.flatnonzero(candidates)
        self.column = np.full(len(candidates), -1, np.int64)  # vocabulary id -> its column in ``ids``
        self.column[self.ids] = np.arange(len(self.ids))
        self.allowed = tokenizer.allowed[self.ids]
        self.close = int(np.searchsorted(self.ids, close))
        self.stops = [int(i) for i in np.searchsorted(self.ids, stops)]
        # for the greedy rows' pass over whole rows (:meth:`_greedy`): the vocabulary ids no row produces, and
        # the ids of ``ids`` a row may be barred from (``</think>`` unless it is thinking, the stops when it
        # ignores EOS)
        self.never = np.flatnonzero(~candidates)
        self.close_id, self.stop_ids = int(close), np.asarray(stops, np.int64)
        # per slot, the counts of the ids it generated, by column of ``ids`` (what the penalties read)
        self.counts = np.zeros((slots, len(self.ids)), np.int64)
        # per slot, the columns it has counts in (a scan of a 151,552-wide counts row costs ~0.4 ms a row)
        self.seen: List[set] = [set() for _ in range(slots)]
        self._bias: Dict[Tuple[int, bool], np.ndarray] = {}  # (vocab, ignore_eos) -> device_row's bias
        self._kept: Optional[_Batch] = None  # the last batch's parameters as arrays (_batch)
        self._barred_by: Dict[Tuple[Tuple[bool, bool], ...], np.ndarray] = {}  # rows' states -> _barred's mask
        # _draw's blocks: their first columns, and each block's columns (the last block's, past the last column,
        # repeat it: a draw past the block's own sum, by rounding, picks the last column)
        n = len(self.ids)
        self._starts = np.arange(0, n, DRAW_BLOCK)
        self._columns = np.minimum(self._starts[:, None] + np.arange(DRAW_BLOCK), n - 1)

    def join(self, slot: int) -> None:
        self.counts[slot] = 0
        self.seen[slot] = set()

    def move(self, source: int, target: int) -> None:
        self.counts[target] = self.counts[source]
        self.seen[target] = set(self.seen[source])

    def count(self, slot: int, token: int) -> None:
        column = self.column[token]
        self.counts[slot, column] += 1
        self.seen[slot].add(int(column))

    def device_row(self, row: _Row, vocab: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The select graph's tables of ``row`` as its tokens so far leave it (``runtime/select.py``; the device
        selects from there on, moving the counts and the state itself): ``bias`` (vocab,) 0 or -inf, ``counts``
        (vocab,), ``params`` (temperature, top_p, frequency, presence), ``state`` (thinking, reasoning tokens left
        before ``</think>`` is forced); float32, ``vocab`` the logits' width. The same rules as :meth:`pick`'s."""
        key = (vocab, bool(row.req.params.ignore_eos))
        if key not in self._bias:
            allowed = np.zeros(vocab, bool)
            inside = self.ids < vocab
            allowed[self.ids[inside]] = self.allowed[inside]
            allowed[self.close_id] = True  # the graph bars it outside a thinking span
            if key[1]:
                allowed[self.stop_ids] = False
            self._bias[key] = np.where(allowed, 0.0, -np.inf).astype(np.float32)
        counts = np.zeros(vocab, np.float32)
        seen = np.array(sorted(self.seen[row.slot]), np.int64)
        if seen.size:
            counts[self.ids[seen]] = self.counts[row.slot, seen]
        req, params = row.req, row.req.params
        budget = params.thinking_budget if params.thinking_budget is not None else params.max_tokens // 2
        return (self._bias[key], counts,
                np.array([params.temperature, params.top_p, params.frequency_penalty, params.presence_penalty],
                         np.float32),
                np.array([1.0 if req.thinking else 0.0, budget - req.reasoning_tokens], np.float32))

    def pick(self, logits: np.ndarray, rows: List[_Row]) -> List[int]:
        """One token per row of ``logits`` (rows, vocab)."""
        close = self.tok.ids["</think>"]
        tokens = [close] * len(rows)
        free = []
        for k, row in enumerate(rows):
            req, params = row.req, row.req.params
            budget = params.thinking_budget if params.thinking_budget is not None else params.max_tokens // 2
            if not (req.thinking and req.reasoning_tokens >= budget):  # else: close the span, an answer follows
                free.append(k)
        greedy = [k for k in free if rows[k].req.params.temperature <= 0]
        for k in greedy:
            tokens[k] = self._greedy(logits[k], rows[k])
        hot = [k for k in free if k not in greedy]  # temperature > 0 (or NaN: the full pass decides)
        if hot:
            some = logits if len(hot) == len(rows) else logits[hot]
            picked = self.ids[self._pick(some.take(self.ids, axis=1), [rows[k] for k in hot])]
            for k, token in zip(hot, picked):
                tokens[k] = int(token)
        return tokens

    def _greedy(self, logits: np.ndarray, row: _Row) -> int:
        """:meth:`_pick`'s token for a greedy row, bit for bit, from the row's logits over the whole vocabulary
        without the full-width float64 copy and penalty arithmetic :meth:`_pick` does (at a 151,552-id
        vocabulary, 8 rows: about 22 ms a step on the dev CPU, against ~1 ms here;
        ``benchmarks/sampler_pick.py``).

        The penalties only lower logits (non-negative ``frequency``/``presence``), and only those of the ids the
        row generated: so the answer is the better of the largest logit among the ids it may produce that it
        did not generate, and the largest penalized logit among those it did, each computed as :meth:`_pick`
        computes it (float64 for the penalized ones; an unpenalized float32 logit is its float64 value). Ties go
        to the smaller id, as ``argmax`` over ``ids`` (ascending) does. Negative penalties raise logits: those
        rows take :meth:`_pick`."""
        params = row.req.params
        if params.frequency_penalty < 0 or params.presence_penalty < 0:
            return int(self.ids[self._pick(np.take(logits[None], self.ids, axis=1).astype(np.float64), [row])[0]])
        x = np.array(logits, dtype=logits.dtype if logits.dtype.kind == "f" else np.float64)
        x[self.never] = -np.inf
        if not row.req.thinking:
            x[self.close_id] = -np.inf
        if params.ignore_eos:
            x[self.stop_ids] = -np.inf
        penalized = params.frequency_penalty != 0 or params.presence_penalty != 0
        seen = np.array(sorted(self.seen[row.slot]) if penalized else [], np.int64)
        seen = seen[np.isfinite(x[self.ids[seen]])] if seen.size else seen  # the ones this row may produce
        if not seen.size:
            return int(np.argmax(x))  # NaN: the first, as the full pass's argmax
        ids, counts = self.ids[seen], self.counts[row.slot, seen]
        values = (x[ids].astype(np.float64) - params.frequency_penalty * counts
                  - params.presence_penalty * (counts > 0))
        x[ids] = -np.inf
        plain = int(np.argmax(x))
        best = int(np.argmax(values))
        if np.isnan(x[plain]) or np.isnan(values[best]):  # argmax's NaN rules across two arrays: the full pass
            return int(self.ids[self._pick(np.take(logits[None], self.ids, axis=1).astype(np.float64), [row])[0]])
        if float(x[plain]) > values[best] or (float(x[plain]) == values[best] and plain < ids[best]):
            return plain
        return int(ids[best])

    def _pick(self, logits: np.ndarray, rows: List[_Row]) -> np.ndarray:
        """The token column of each row of ``logits`` (rows, ``len(ids)``; the caller's copy, which this overwrites
        where it has the working dtype): the penalties, the ids barred, then argmax (temperature 0) or a draw from
        the softmax at the row's temperature, within its top-p nucleus.

        The arithmetic is a fixed sequence, each row's its own whatever shares its batch: the penalties in float64
        (as :meth:`_greedy` computes them), the barred ids, the greedy rows' argmax; then in float32 (the logits'
        own precision) the difference to the row's maximum over its temperature (in float32 too) and the exp;
        float64 sums (:meth:`_draw`). It runs in place on ``logits`` (a float32 copy after a float64 pass). Right
        after a decoder call the CPU's caches hold the decoder's weights and KV cache, not this: each array a step
        allocates fresh is read from memory, and with a temporary per operation (as ``np.where`` and friends make)
        8 rows of the tiny vocabulary took ~300 us a step in the server against ~190 us alone; in place, the working
        set is the one array (docs/benchmarks.md, eleventh session)."""
        params = [r.req.params for r in rows]
        batch = self._batch(params)
        if batch.penalized:  # in float64, as _greedy computes them (the logits' float32 values are exact in it)
            logits = logits.astype(np.float64, copy=False)
            counts = self.counts[[r.slot for r in rows]]
            logits -= batch.frequency[:, None] * counts
            logits -= batch.presence[:, None] * (counts > 0)
        np.copyto(logits, -np.inf, where=self._barred(rows, params))
        hot = batch.hot
        if hot.size == len(rows):  # every row samples: the argmax is never read
            tokens = np.zeros(len(rows), np.int64)
        else:
            tokens = logits.argmax(axis=1)
        if hot.size:  # over every row (whole-array operations are cheaper than picking rows first)
            # from here on in float32, in place: the logits' own values (a penalized row's rounded once), so a row
            # computes the same numbers whatever shares its batch
            weights = logits.astype(np.float32, copy=False)
            # the ufuncs' own reductions: what ``.max``/``.sum``/``np.cumsum`` call, without their Python wrappers
            # (a few microseconds each, twice that right after a decoder call); the maximum first, then the
            # temperature, so a tiny temperature sends the others to -inf, not the row to inf - inf
            weights -= np.maximum.reduce(weights, axis=1, keepdims=True)
            with np.errstate(over="ignore"):  # past float32's range: -inf, a weight of 0, as meant
                weights /= batch.divisor
            # exp in float32: numpy's float64 exp has no AVX2 kernel (1.0 ms for 8 x 4096 here, 0.15 ms in
            # float32); the sums and the draw are float64
            np.exp(weights, out=weights)
            nucleus = batch.nucleus
            if nucleus.size:
                part = weights[nucleus].astype(np.float64)
                weights[nucleus] = part * _nucleus(part / part.sum(axis=1, keepdims=True), batch.top_p[nucleus])
            draws = np.array([rows[k].req.draws.take() for k in hot])  # greedy rows draw nothing
            tokens[hot] = self._draw(weights if hot.size == len(rows) else weights[hot], draws)
        return tokens

    def _draw(self, weights: np.ndarray, draws: np.ndarray) -> np.ndarray:
        """Per row of ``weights`` (rows, ``len(ids)``; non-negative, unnormalized), the first column whose running
        sum exceeds its ``draws`` (uniform in [0, 1)) times the row's total: the inverse of its cumulative
        distribution, as ``Generator.choice`` draws.

        In two levels, not one running sum over every column: the sums of blocks of :data:`DRAW_BLOCK` columns,
        their running sum, the block the draw falls in, then the running sum within that block alone. A running
        sum is a chain of dependent additions (~3 ns a column here, 30 us for 8 rows of the tiny vocabulary,
        the largest part of a step's sampling); this adds each column once, in a reduction that vectorizes, and
        chains only the blocks and one block per row (~30 us against ~70 for the normalized one-level pass it
        replaced, which it equals but for a draw within rounding of a column's edge: none in 160,000 draws).
        A row whose column comes out with no weight (rounding at the end of the last blocks) takes the one-level
        pass, as does a NaN row (its first column, as before)."""
        n = weights.shape[1]
        starts = self._starts
        # the blocks' running sums after a 0: ``ahead[:, b]`` is the weight before block b
        ahead = np.zeros((len(draws), len(starts) + 1))
        cum = np.add.accumulate(np.add.reduceat(weights, starts, axis=1, dtype=np.float64), axis=1, out=ahead[:, 1:])
        target = draws * cum[:, -1]
        index = np.arange(len(draws))
        block = np.add.reduce(cum <= target[:, None], axis=1)
        np.minimum(block, len(starts) - 1, out=block)
        before = ahead[index, block]
        columns = self._columns[block]
        inner = np.add.accumulate(weights[index[:, None], columns], axis=1, dtype=np.float64)
        inner += before[:, None]
        within = np.add.reduce(inner <= target[:, None], axis=1)
        np.minimum(within, DRAW_BLOCK - 1, out=within)
        picked = columns[index, within]
        odd = np.flatnonzero(~(weights[index, picked] > 0))
        for k in odd:  # rare: the one-level pass
            row = weights[k].astype(np.float64)
            cdf = np.add.accumulate(row / np.add.reduce(row))
            cdf /= cdf[-1]
            picked[k] = min(int(np.add.reduce(cdf <= draws[k])), n - 1)
        return picked

    def _batch(self, params: List[SamplingParams]) -> _Batch:
        """The rows' parameters as arrays, kept while the same requests' parameters come in the same order (a
        decode step's batch rarely changes; a request's parameters do not change while it runs)."""
        kept = self._kept
        if kept is not None and len(kept.params) == len(params) and all(a is b for a, b in zip(kept.params, params)):
            return kept
        frequency = np.array([p.frequency_penalty for p in params])
        presence = np.array([p.presence_penalty for p in params])
        temperature = np.array([p.temperature for p in params])
        top_p = np.array([p.top_p for p in params])
        # the temperatures in float32, the logits' own precision (a float64 divisor made numpy's division cast each
        # element both ways: ~17 us against ~4.5 for 8 x 1,238); one below float32's normal range divides by its least
        divisor = np.where(temperature > 0, np.maximum(temperature.astype(np.float32), TINIEST), np.float32(1.0))
        self._kept = _Batch(tuple(params), bool(frequency.any() or presence.any()), frequency, presence,
                            np.flatnonzero(temperature > 0), divisor[:, None], top_p,
                            np.flatnonzero((top_p < 1.0) & (temperature > 0)))
        return self._kept

    def _barred(self, rows: List[_Row], params: List[SamplingParams]) -> np.ndarray:
        """(rows, ``len(ids)``) bool: the columns each row may not produce (never allowed, ``</think>`` outside a
        thinking span, the stop ids when it ignores EOS), kept per combination of the rows' states (a decode
        step's rows rarely change theirs)."""
        key = tuple((r.req.thinking, p.ignore_eos) for r, p in zip(rows, params))
        barred = self._barred_by.get(key)
        if barred is None:
            allowed = np.broadcast_to(self.allowed, (len(rows), len(self.allowed))).copy()
            allowed[:, self.close] = [thinking for thinking, _ in key]
            no_eos = [k for k, (_, ignore) in enumerate(key) if ignore]
            if no_eos:
                allowed[np.ix_(no_eos, self.stops)] = False
            if len(self._barred_by) >= 16:  # rows x the ids, each (at 151,552 ids and 8 rows, 1.2 MB): the latest
                self._barred_by.clear()
            barred = self._barred_by[key] = ~allowed
        return barred


def _nucleus(probs: np.ndarray, top_p: np.ndarray, head: int = 64) -> np.ndarray:
    """Per row, 1 on the most probable ids whose mass first reaches ``top_p``, else 0.

    The ids are those of a full descending sort (:func:`_nucleus_sorted`), found by sorting only each row's
    ``head`` most probable ones (``np.argpartition``): the sums over them are the full sort's first
    ``head`` partial sums, bit for bit (the same values added in the same order; equal values swapped
    change no sum). A row whose mass stays below ``top_p`` within its head, or whose cut falls between
    two equal probabilities (which of them the full sort keeps is up to its tie order), takes the full
    sort.
    """
    n = probs.shape[1]
    if head >= n:
        return _nucleus_sorted(probs, top_p)
    top = np.argpartition(probs, n - head, axis=1)[:, n - head:]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(probs, top, axis=1), axis=1), axis=1)
    ordered = np.take_along_axis(probs, top, axis=1)
    cut = (np.cumsum(ordered, axis=1) < top_p[:, None]).sum(axis=1) + 1
    keep = np.zeros(probs.shape)
    full = []
    for k, c in enumerate(cut):
        if c >= head or ordered[k, c - 1] == ordered[k, c]:
            full.append(k)
        else:
            keep[k, top[k, :c]] = 1.0
    if full:
        keep[full] = _nucleus_sorted(probs[full], top_p[full])
    return keep


def _nucleus_sorted(probs: np.ndarray, top_p: np.ndarray) -> np.ndarray:
    """:func:`_nucleus` by a full sort of every row (the reference; the rows the head cannot decide)."""
    order = np.argsort(-probs, axis=1)
    cumulative = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)
    cut = (cumulative < top_p[:, None]).sum(axis=1) + 1
    keep = np.zeros(probs.shape)
    np.put_along_axis(keep, order, (np.arange(probs.shape[1])[None, :] < cut[:, None]).astype(float), axis=1)
    return keep
