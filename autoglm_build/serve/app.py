"""The OpenAI-compatible HTTP API (FastAPI) over a :class:`~autoglm_build.runtime.generation.Scheduler`.

Endpoints: ``/health`` (liveness), ``/ready`` (backend loaded, batch state), ``/metrics`` (the
scheduler's and the prefix cache's counters in Prometheus' text format), ``/v1/models``,
``/v1/completions``, ``/v1/chat/completions`` (streamed as server-sent events in OpenAI's chunk
format, ending with ``data: [DONE]``). Every error is OpenAI's error JSON
(``{"error": {"message", "type", "param", "code"}}``) with the matching status:

- malformed JSON or fields: 400 ``invalid_request_error`` naming the field
- prompt + ``max_tokens`` beyond the context: 400 ``context_length_exceeded``
- unknown model: 404 ``model_not_found``; missing/wrong API key (when one is set): 401
- body over ``serve.max_body_bytes``: 413; queue full: 429 with ``Retry-After``
- shutting down: 503
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import weakref
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Dict, FrozenSet, List, Optional, Tuple, Union

from fastapi import APIRouter, Depends, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from autoglm_build.config import BuildConfig
from autoglm_build.runtime.backends import Backend
from autoglm_build.runtime.generation import QueueFull, Request, SamplingParams, Scheduler, SchedulerStopped
from autoglm_build.runtime.media import MediaError, decode_base64, encode_audio, encode_image, image_bytes
from autoglm_build.runtime.text import ChatTokenizer, Prompt, Segment
from autoglm_build.serve.protocol import (
    BRANCH_TAG,
    AudioPart,
    ChatCompletionRequest,
    CompletionRequest,
    ImagePart,
    TextPart,
)


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ServerState:
    """What the app serves: the config, backend, tokenizer and scheduler, plus the API key."""

    cfg: BuildConfig
    backend: Backend
    tokenizer: ChatTokenizer
    scheduler: Scheduler
    api_key: Optional[str] = None
    model_ids: Tuple[str, ...] = ()
    created: int = field(default_factory=lambda: int(time.time()))
    media_lock: threading.Lock = field(default_factory=threading.Lock)  # one encoder call at a time (one context)
    stream_interval: float = 0.0  # seconds: a stream's chunks at most this often (serve.stream_interval_ms)
    cpus: Optional[Tuple[FrozenSet[int], FrozenSet[int]]] = None  # the scheduler's cores, the loop's (cpu_split)


def validation_error(exc: ValidationError) -> APIError:
    """The first problem as one line naming the field, e.g. ``messages.0.role: Input should be ...``."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "union[", BRANCH_TAG)))
    msg = err["msg"].replace("Value error, ", "")
    return APIError(400, f"{loc}: {msg}" if loc else msg, param=loc or None)


class BodyLimit:
    """ASGI middleware: 413 for request bodies over ``limit`` bytes (declared or streamed)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _send_error(send, APIError(413, f"request body of {int(declared)} bytes exceeds the "
                                                         f"limit of {self.limit} bytes", code="request_too_large"))
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # answered by the app's APIError handler
                    raise APIError(413, f"request body exceeds the limit of {self.limit} bytes",
                                   code="request_too_large")
            return message

        await self.app(scope, limited, send)


async def _send_error(send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the scheduler; on shutdown finish what is running, stop it and release the backend."""
    state: ServerState = app.state.server
    # the scheduler's own thread on its cores; the event loop's thread is pinned by serve(), the server's process
    # (an app in a test's process leaves the test's threads where they are)
    state.scheduler.start(cpus=state.cpus[0] if state.cpus is not None else None)
    # streams paced on the scheduler's engine calls where those hold its thread (ONNX Runtime): the chunks are written
    # while the engine runs (EventBridge); a scheduler that launches its steps ahead (the GPU) leaves the streams their
    # own timers, as its waits are short and come at no fixed point
    paced = bridge(asyncio.get_running_loop()) if not state.scheduler.overlapping else None
    if paced is not None:  # read by the scheduler's thread at each step, from its next step on
        paced.pacing, state.scheduler.tick = True, paced.tick
    try:
        yield
    finally:
        await run_in_threadpool(state.scheduler.stop)
        if paced is not None:
            paced.pacing, state.scheduler.tick = False, None
        state.backend.close()


async def _api_error(request: HTTPRequest, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: HTTPRequest, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(APIError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code)


async def _internal(request: HTTPRequest, exc: Exception) -> JSONResponse:
    return JSONResponse(APIError(500, f"internal error: {exc.__class__.__name__}", "server_error").body(),
                        status_code=500)


def create_app(state: ServerState):
    """The ASGI application: the routes below over ``state`` (``app.state.server``), behind the body cap.
    The scheduler is started and stopped by the app's lifespan."""
    app = FastAPI(title="autoglm-build serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  exception_handlers={APIError: _api_error, StarletteHTTPException: _http_error,
                                      Exception: _internal})
    app.state.server = state
    app.include_router(router)
    return BodyLimit(app, state.cfg.serve.max_body_bytes)


# ---- routes ------------------------------------------------------------------------------------

router = APIRouter()


def get_state(request: HTTPRequest) -> ServerState:
    """The serving state of the app that received ``request`` (set by :func:`create_app`)."""
    return request.app.state.server


def authorized(request: HTTPRequest, state: ServerState = Depends(get_state)) -> ServerState:
    """The state, once the request carries the API key (when the server has one): 401 otherwise."""
    if state.api_key:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), state.api_key):
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                           "authentication_error", code="invalid_api_key")
    return state


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/ready")
async def ready(state: ServerState = Depends(get_state)):
    s = state.scheduler
    body = {"status": "ready" if s.running else "not ready", **state.backend.describe(), **s.stats()}
    return JSONResponse(body, status_code=200 if s.running else 503)


#: stats that only grow (Prometheus counters, ``_total``); the others are gauges
COUNTERS = frozenset({"decode_steps", "overlapped_steps", "tokens", "prefill_tokens", "prefill_positions", "hits",
                      "misses", "tokens_queried", "tokens_reused", "blocks_stored", "evictions", "captures",
                      "launches", "refused"})


def prometheus(stats: Dict[str, Any], prefix: str = "autoglm_") -> str:
    """Numeric ``stats`` (nested dicts flattened into the name) in Prometheus' text exposition format."""
    lines = []
    for key, value in stats.items():
        name = prefix + key
        if isinstance(value, dict):
            lines.append(prometheus(value, name + "_").rstrip("\n"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            kind = "counter" if key in COUNTERS else "gauge"
            name += "_total" if kind == "counter" else ""
            lines += [f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(line for line in lines if line) + "\n"


@router.get("/metrics")
async def metrics(state: ServerState = Depends(get_state)):
    """The scheduler's counters and the prefix cache's (hits, misses, tokens reused, evictions, bytes held)."""
    return PlainTextResponse(prometheus(state.scheduler.stats()), media_type="text/plain; version=0.0.4")


@router.get("/v1/models")
async def models(state: ServerState = Depends(authorized)):
    return {"object": "list", "data": [
        {"id": m, "object": "model", "created": state.created, "owned_by": "autoglm-build",
         "max_model_len": state.scheduler.context} for m in state.model_ids]}


@router.post("/v1/chat/completions")
async def chat(request: HTTPRequest, state: ServerState = Depends(authorized)):
    body: ChatCompletionRequest = await parse(request, state, ChatCompletionRequest)
    prompt = await run_in_threadpool(chat_prompt, state, body)
    max_tokens = body.max_completion_tokens or body.max_tokens
    params = sampling(state, body, prompt, max_tokens, body.thinking_budget)
    return await respond(state, body, prompt, params, chat=True, reasoning=body.return_reasoning)


@router.post("/v1/completions")
async def completions(request: HTTPRequest, state: ServerState = Depends(authorized)):
    body: CompletionRequest = await parse(request, state, CompletionRequest)
    prompt = state.tokenizer.text_prompt(body.prompt)
    params = sampling(state, body, prompt, body.max_tokens, None)
    return await respond(state, body, prompt, params, chat=False, reasoning=False)


async def parse(request: HTTPRequest, state: ServerState, model):
    """The request body as ``model`` (400 naming the field), for a model this server serves (404)."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON ({exc.__class__.__name__}: {exc})") from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        body = model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None
    if body.model not in state.model_ids:
        raise APIError(404, f"model '{body.model}' does not exist; this server serves "
                            f"{', '.join(state.model_ids)}", "invalid_request_error", "model", "model_not_found")
    return body


async def respond(state: ServerState, body, prompt: Prompt, params: SamplingParams, chat: bool, reasoning: bool):
    """The completion: streamed as server-sent events when the body asks, else one JSON object."""
    # a stream's chunks at most every serve.stream_interval_ms; a whole answer takes its events as they come
    events, request = submit(state, prompt, params, state.stream_interval if body.stream else 0.0,
                             bool(body.stream))
    ident = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = stream_chunks(events, request, ident, created, body.model, chat, reasoning, include_usage)
        return StreamingResponse(chunks, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    text, thought, done = await collect(events, request, reasoning)
    if chat:
        message = {"role": "assistant", "content": text}
        if reasoning:
            message["reasoning_content"] = thought
        choice = {"index": 0, "message": message, "finish_reason": done["finish_reason"], "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": done["finish_reason"], "logprobs": None}
    return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": body.model, "choices": [choice], "usage": done["usage"]}


async def collect(events: AsyncIterator[Dict], request: Request, reasoning: bool) -> Tuple[str, str, Dict]:
    """A whole generation: ``(content, reasoning text, the final event)``; a failed one is a 500."""
    text, thought, done = "", "", None
    try:
        async for event in events:
            if event["type"] == "delta":
                text += shown_content(event, reasoning)
                thought += event["reasoning"]
            else:
                done = event
    finally:
        request.cancel()
    if done["type"] == "error":
        raise APIError(500, done["message"], "server_error")
    return text, thought, done


def chat_prompt(state: ServerState, body: ChatCompletionRequest) -> Prompt:
    """The chat turns as segments (media through their encoders), in GLM's chat format."""
    turns: List[Tuple[str, List[Segment]]] = []
    limit, media = state.cfg.serve.max_media_per_request, 0
    for i, message in enumerate(body.messages):
        role = "system" if message.role == "developer" else message.role
        parts = [TextPart(type="text", text=message.content or "")] if not isinstance(message.content, list) \
            else message.content
        segments = []
        for j, part in enumerate(parts):
            param = f"messages.{i}.content.{j}"
            if isinstance(part, TextPart):
                segments.append(Segment(text=part.text))
                continue
            media += 1
            if media > limit:
                raise APIError(400, f"{param}: more than {limit} images/audio clips in one request", param=param)
            segments.append(media_segment(state, part, param))
        turns.append((role, segments))
    return state.tokenizer.chat_prompt(turns, body.thinking())


def media_segment(state: ServerState, part: Union[ImagePart, AudioPart], param: str) -> Segment:
    """One image or audio part through its encoder; what cannot be used is a 400 naming the field."""
    needed, field = ("vision", "image_url") if isinstance(part, ImagePart) else ("audio", "input_audio")
    if needed not in state.backend.parts:  # loaded: the module, or its stages (vision.stages)
        raise APIError(400, f"{param}: this build has no {needed} module", param=param)
    try:
        # the lock is held around the encoder call only: requests decode and preprocess concurrently
        if isinstance(part, ImagePart):
            data = image_bytes(part.image_url.url, f"{param}.image_url.url")
            return encode_image(state.backend, state.cfg, data, f"{param}.image_url", state.media_lock)
        data = decode_base64(part.input_audio.data, f"{param}.input_audio.data")
        return encode_audio(state.backend, state.cfg, data, f"{param}.input_audio", state.media_lock)
    except MediaError as exc:
        raise APIError(400, exc.message, param=exc.param) from None
    except ImportError as exc:  # e.g. the GPU harness's Python without Pillow/transformers
        kind = "images" if needed == "vision" else "audio"
        raise APIError(400, f"{param}.{field}: this server cannot preprocess {kind} ({exc.name} is not "
                            f"installed)", param=f"{param}.{field}", code="unsupported_media") from None


def sampling(state: ServerState, body, prompt: Prompt, max_tokens: Optional[int],
             thinking_budget: Optional[int]) -> SamplingParams:
    """Request parameters, with the context bound checked (400 ``context_length_exceeded``)."""
    context = state.scheduler.context
    room = context - len(prompt.ids)
    if room < 1 or (max_tokens is not None and max_tokens > room):
        asked = max_tokens if max_tokens is not None else 1
        raise APIError(400, f"this model's context is {context} tokens; the prompt has {len(prompt.ids)} and "
                            f"{asked} more were requested", param="max_tokens" if max_tokens else "messages",
                       code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(state.cfg.serve.max_tokens, room)
    budget = thinking_budget if thinking_budget is not None else state.cfg.serve.thinking_budget
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                          stop=tuple(body.stop or ()), thinking_budget=budget, ignore_eos=body.ignore_eos,
                          frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
                          skip_special_tokens=body.skip_special_tokens)


def shown_content(event: Dict[str, Any], reasoning: bool) -> str:
    """A delta event's ``content``: without ``return_reasoning`` the thinking text stays in it, as vLLM
    returns it without a reasoning parser (the phone agent reads its thinking there); the tags never."""
    return event["content"] if reasoning else event["reasoning"] + event["content"]


class EventBridge:
    """The scheduler thread's events onto one asyncio loop, waking the loop as seldom as its readers allow and,
    where it can, while the scheduler is inside an engine call.

    An event joins a list under a lock; the loop's thread moves the list onto the readers' queues, in order
    (:meth:`flush`). The scheduler wakes the loop (``call_soon_threadsafe``: a write to the loop's self-pipe) at
    once only for an event a reader waits for now: a request's last event (done or error), or a delta for a queue
    whose reader waits on it empty (:attr:`EventQueue.listening`: a stream between chunks, not one pausing for
    its interval, nor a whole answer, which waits for its last event); a stream paused by
    ``serve.stream_interval_ms`` finds the deltas waiting when its pause ends, and flushes them itself
    (:meth:`EventQueue.next_event`).

    With :attr:`pacing` (the app sets it where the scheduler's engine calls hold its thread: ONNX Runtime) the
    paused streams' pauses end on :meth:`tick` instead of their own timers: the scheduler calls it before each
    step's engine calls, and at most once per interval it wakes the loop for every paused stream at once, so their
    chunks are written while the engine runs without the GIL, not at each stream's own moment between two engine
    calls. A scheduler that launches its steps ahead (the GPU) has short waits at no fixed point; its streams keep
    their own timers.

    Why: on the 2-core dev machine one wakeup per decode step cost the scheduler's thread ~10 % of its rate (the
    write, and the loop's thread taking the GIL at once), and the streams' own timers, ~1,600 wakeups a second at 8
    streams, each taking the GIL wherever the scheduler let it go (a numpy call), another ~6 %
    (docs/benchmarks.md, twelfth session). Emitting onto a closed loop raises (``RuntimeError``), which ends
    the row, as before.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = weakref.ref(loop)  # not the loop itself: the bridges' map is keyed weakly by it
        self.lock = threading.Lock()
        self.pending: List[Tuple[asyncio.Queue, Dict[str, Any]]] = []
        self.scheduled = False  # a flush is scheduled on the loop and has not run yet
        self.paced: set = set()  # the paced streams' queues while they pause (loop thread; tick reads its size)
        self.pacing = False  # the scheduler calls tick before its engine calls: streams pause until its flushes
        self.interval = 0.0  # the paced streams' interval, seconds
        self.due = 0.0  # time.monotonic() when tick may wake the loop again
        self.wakeups = 0  # flushes scheduled from another thread

    def emit(self, queue: asyncio.Queue, event: Dict[str, Any]) -> None:
        """From any thread: ``event`` onto ``queue`` (a queue of this loop)."""
        loop = self.loop()
        if loop is None or loop.is_closed():  # nobody will read it
            raise RuntimeError("the event loop is closed")
        with self.lock:
            self.pending.append((queue, event))
            if self.scheduled or (event["type"] == "delta" and not getattr(queue, "listening", True)):
                return
            self.scheduled = True
        self._wake(loop)

    def tick(self) -> None:
        """From the scheduler's thread, before a step's engine calls: a flush for the paced streams, if any
        pauses, an interval has passed since the last such, and no flush is scheduled already (that one ends their
        pauses as well: :meth:`flush`)."""
        if not self.paced or self.scheduled or time.monotonic() < self.due:
            return
        loop = self.loop()
        with self.lock:
            if self.scheduled or loop is None:
                return
            self.scheduled = True
        self.due = time.monotonic() + self.interval
        try:
            self._wake(loop)
        except RuntimeError:  # the loop is closed: its streams are gone
            pass

    def _wake(self, loop: asyncio.AbstractEventLoop) -> None:
        self.wakeups += 1
        try:
            loop.call_soon_threadsafe(self.flush)
        except RuntimeError:  # closed meanwhile: nobody will read these
            with self.lock:
                self.pending.clear()
                self.scheduled = False
            raise

    def flush(self) -> None:
        """On the loop's thread: every waiting event onto its queue, in order; then each paced stream that has
        something to send ends its pause if its interval is at least half over. At a tick's flush that is every
        stream that sent at the one before; a stream that sent its first chunk between two ticks waits for the
        next but one rather than send again half an interval later."""
        with self.lock:
            batch, self.pending = self.pending, []
            self.scheduled = False
        for queue, event in batch:
            queue.put_nowait(event)
        if self.paced:
            loop = self.loop()
            now = loop.time() if loop is not None else 0.0
            for queue in self.paced:
                if not queue.empty() and now >= queue.deadline - self.interval / 2:
                    queue.resume()


_bridges: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, EventBridge] = weakref.WeakKeyDictionary()


def bridge(loop: asyncio.AbstractEventLoop) -> EventBridge:
    """The loop's :class:`EventBridge` (called on the loop's own thread)."""
    found = _bridges.get(loop)
    if found is None:
        found = _bridges[loop] = EventBridge(loop)
    return found


class EventQueue(asyncio.Queue):
    """A request's events on its loop. A stream that waits between chunks (:meth:`pause`) is woken at once by the
    request's last event (done or error): the end of a stream is never held back.

    Args:
        bridge: the :class:`EventBridge` that fills it; :meth:`next_event` flushes it first. None: filled on the
            loop itself.
        eager: its reader takes deltas as they come (a stream): while it waits on an empty queue, a delta wakes
            the loop. False (a whole answer): only its last event wakes the loop; its deltas come with it (or with
            another reader's flush before it).
    """

    def __init__(self, bridge: Optional[EventBridge] = None, eager: bool = True) -> None:
        super().__init__()
        self.bridge, self.eager = bridge, eager
        self.final = False  # the done or error event is in
        self.listening = False  # the reader waits on this queue empty and wants deltas (EventBridge.emit reads it)
        self.deadline = 0.0  # loop.time() when the current pause ends without a bridge
        self._pausing: Optional[asyncio.Future] = None

    def put_nowait(self, item: Dict[str, Any]) -> None:
        super().put_nowait(item)
        if item["type"] != "delta":
            self.final = True
            _wake(self._pausing)

    async def next_event(self) -> Dict[str, Any]:
        """The next event: the bridge's waiting events moved in first, then the queue's first, waited for if
        there is none (woken by the next delta when ``eager``, else by the last event)."""
        if self.bridge is None:
            return await self.get()
        # listening before the flush: an emit after the flush sees it (under the bridge's lock) and wakes the loop
        self.listening = self.eager
        try:
            self.bridge.flush()
            return await self.get()
        finally:
            self.listening = False

    async def pause(self, seconds: float) -> None:
        """Wait ``seconds``, or until the final event is put, whichever comes first. With a paced bridge, the
        pause ends at the bridge's paced flush near that time instead (:meth:`EventBridge.tick`,
        :meth:`EventBridge.flush`), once the queue has something to send; an interval after ``seconds`` at
        the latest, should the scheduler's ticks stop."""
        if seconds <= 0 or self.final:
            return
        loop = asyncio.get_running_loop()
        self._pausing = waiting = loop.create_future()
        self.deadline = loop.time() + seconds
        paced = self.bridge is not None and self.bridge.pacing and self.bridge.interval > 0
        timer = loop.call_later(seconds + (self.bridge.interval if paced else 0.0), _wake, waiting)
        if paced:
            self.bridge.paced.add(self)
        try:
            await waiting
        finally:
            timer.cancel()
            self._pausing = None
            if paced:
                self.bridge.paced.discard(self)

    def resume(self) -> None:
        """End a :meth:`pause` now."""
        _wake(self._pausing)


def _wake(future: Optional[asyncio.Future]) -> None:
    if future is not None and not future.done():
        future.set_result(None)


def submit(state: ServerState, prompt: Prompt, params: SamplingParams, interval: float = 0.0,
           stream: bool = True) -> Tuple[AsyncIterator[Dict], Request]:
    """Queue a request; its events arrive on an asyncio queue of the calling loop (``interval``: as
    :func:`queued_events` takes them; ``stream``: read as they come, else all at the end)."""
    found = bridge(asyncio.get_running_loop())
    if stream and interval > 0:
        found.interval = interval  # the server's one stream interval
    queue = EventQueue(found, eager=stream)
    emit = found.emit
    request = Request(prompt, params, emit=lambda event: emit(queue, event))
    try:
        state.scheduler.submit(request)
    except QueueFull:
        raise APIError(429, f"server busy: {state.scheduler.max_batch} requests generating and "
                            f"{state.scheduler.queue_size} waiting; retry shortly", "rate_limit_error",
                       code="queue_full", headers={"Retry-After": "1"}) from None
    except SchedulerStopped:
        raise APIError(503, "server is shutting down", "server_error", code="shutting_down") from None

    return queued_events(queue, interval), request


async def queued_events(queue: asyncio.Queue, interval: float = 0.0) -> AsyncIterator[Dict]:
    """A request's events off its queue, up to and including the first that is not a delta. Deltas that are
    already waiting when one is taken go out with it as one (their texts joined, reasoning before content as
    the scheduler emits them): a stream whose loop fell behind the decode steps sends one chunk for what
    waits, not one per token, and catches up (vLLM V1's output collector merges a slow consumer's deltas the
    same way). A stream that keeps up gets one chunk per token, unless ``interval`` (seconds,
    ``serve.stream_interval_ms``): then, after a delta, the next is taken no sooner than ``interval`` after it, with
    what arrived meanwhile joined to it. The first delta goes at once, and so does the final event (an
    :class:`EventQueue` ends the wait when it arrives)."""
    loop = asyncio.get_running_loop()
    take = getattr(queue, "next_event", queue.get)  # an EventQueue moves its bridge's waiting events in first
    held: Optional[Dict] = None
    sent: Optional[float] = None  # when the last delta was handed on
    while True:
        if interval > 0 and sent is not None and (held is None or held["type"] == "delta"):
            left = sent + interval - loop.time()
            pause = getattr(queue, "pause", None)
            await (pause(left) if pause is not None else asyncio.sleep(max(left, 0.0)))
        event, held = (held, None) if held is not None else (await take(), None)
        while event["type"] == "delta" and not queue.empty():
            later = queue.get_nowait()
            if later["type"] != "delta" or (event["content"] and later["reasoning"]):
                held = later  # not a delta, or reasoning after content: its own event, in order
                break
            event = {**event, "reasoning": event["reasoning"] + later["reasoning"],
                     "content": event["content"] + later["content"]}
        if event["type"] == "delta":
            sent = loop.time()
        yield event
        if event["type"] != "delta":
            return


@dataclass
class Chunks:
    """OpenAI's stream chunks of one completion, each as a server-sent event."""

    ident: str
    created: int
    model: str
    chat: bool
    _frame: Optional[Tuple[str, str]] = field(default=None, init=False, repr=False)

    def event(self, delta: Optional[Dict[str, Any]] = None, text: str = "", finish: Optional[str] = None,
              usage: Optional[Dict] = None, choices: bool = True) -> str:
        if self.chat:
            choice = {"index": 0, "delta": delta or {}, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        data = {"id": self.ident, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice] if choices else []}
        if usage is not None:
            data["usage"] = usage
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def delta(self, event: Dict[str, Any], reasoning: bool) -> Optional[str]:
        """The chunk of a delta event, or None when it shows nothing."""
        if not self.chat:
            return self._framed(event["content"]) if event["content"] else None
        text = shown_content(event, reasoning)
        delta = {"content": text} if text else {}
        if reasoning and event["reasoning"]:
            delta["reasoning_content"] = event["reasoning"]
        return self._framed(delta) if delta else None

    def _framed(self, value: Any) -> str:
        """``event(delta=value)`` (chat) or ``event(text=value)``, the same text: the chunk's JSON around
        the value is made once per stream, and only the value is encoded per token."""
        if self._frame is None:
            marker = f"<{secrets.token_hex(16)}>"
            line = self.event(marker) if self.chat else self.event(text=marker)
            head, tail = line.split(json.dumps(marker))
            self._frame = (head, tail)
        return self._frame[0] + json.dumps(value, ensure_ascii=False) + self._frame[1]


async def stream_chunks(events: AsyncIterator[Dict], request: Request, ident: str, created: int, model: str,
                        chat: bool, reasoning: bool, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format; a client that goes away cancels the request."""
    chunks = Chunks(ident, created, model, chat)
    try:
        if chat:
            yield chunks.event({"role": "assistant", "content": ""})
        async for event in events:
            if event["type"] == "delta":
                line = chunks.delta(event, reasoning)
                if line:
                    yield line
            elif event["type"] == "done":
                yield chunks.event({}, finish=event["finish_reason"])
                if include_usage:
                    yield chunks.event(usage=event["usage"], choices=False)
            else:
                err = APIError(500, event["message"], "server_error")
                yield f"data: {json.dumps(err.body())}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        request.cancel()
