"""``autoglm-build serve``: load a build, start the scheduler, and run uvicorn.

SIGTERM/SIGINT: uvicorn stops accepting connections and waits for in-flight requests (streams
included) to finish; then the app's lifespan stops the scheduler and releases the backend.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Callable, FrozenSet, List, Optional, Sequence, Tuple

from autoglm_build.config import BuildConfig
from autoglm_build.errors import EnvironmentMissing, UserError
from autoglm_build.runtime.backends import open_backend
from autoglm_build.runtime.generation import Scheduler
from autoglm_build.runtime.text import ChatTokenizer
from autoglm_build.serve.app import ServerState, create_app

log = logging.getLogger("autoglm_build.serve")

API_KEY_ENV = "AUTOGLM_BUILD_API_KEY"
#: overrides ``serve.prefix_cache_mib`` (0: reuse off) without another config file, which a workdir
#: built from its own config would refuse: the load benchmark serves one build both ways
PREFIX_CACHE_ENV = "AUTOGLM_BUILD_PREFIX_CACHE_MIB"
#: overrides ``serve.overlap`` (1 on, 0 off) likewise: the load benchmark A/Bs one build both ways
OVERLAP_ENV = "AUTOGLM_BUILD_OVERLAP"
#: overrides ``serve.cuda_graphs`` (1 on, 0 off) likewise
CUDA_GRAPHS_ENV = "AUTOGLM_BUILD_CUDA_GRAPHS"
#: overrides ``serve.device_select`` (1 on, 0 off) likewise
DEVICE_SELECT_ENV = "AUTOGLM_BUILD_DEVICE_SELECT"
#: overrides ``serve.stream_interval_ms`` likewise
STREAM_INTERVAL_ENV = "AUTOGLM_BUILD_STREAM_INTERVAL_MS"
#: overrides ``serve.cpu_affinity`` (1 on, 0 off) likewise
CPU_AFFINITY_ENV = "AUTOGLM_BUILD_CPU_AFFINITY"


def prefix_cache_bytes(cfg: BuildConfig) -> int:
    """The prefix cache's budget: ``$AUTOGLM_BUILD_PREFIX_CACHE_MIB``, else ``serve.prefix_cache_mib``."""
    raw = os.environ.get(PREFIX_CACHE_ENV)
    if raw is None or not raw.strip():
        return cfg.serve.prefix_cache_mib << 20
    if not raw.strip().isdigit():
        raise UserError(f"${PREFIX_CACHE_ENV}: '{raw}' is not a whole number of MiB",
                        hint=f"unset it to use serve.prefix_cache_mib ({cfg.serve.prefix_cache_mib})")
    return int(raw) << 20


def _switch(cfg: BuildConfig, env: str, field: str) -> bool:
    """``$<env>`` (1 or 0), else ``serve.<field>``."""
    default = getattr(cfg.serve, field)
    raw = os.environ.get(env, "").strip()
    if not raw:
        return default
    if raw not in ("0", "1"):
        raise UserError(f"${env}: '{raw}' is not 1 (on) or 0 (off)",
                        hint=f"unset it to use serve.{field} ({str(default).lower()})")
    return raw == "1"


def decode_overlap(cfg: BuildConfig) -> bool:
    """Whether the scheduler launches each decode step before the previous step's text work:
    ``$AUTOGLM_BUILD_OVERLAP`` (1 or 0), else ``serve.overlap``."""
    return _switch(cfg, OVERLAP_ENV, "overlap")


def stream_interval(cfg: BuildConfig) -> float:
    """Seconds between a stream's chunks at most: ``$AUTOGLM_BUILD_STREAM_INTERVAL_MS``, else
    ``serve.stream_interval_ms``."""
    raw = os.environ.get(STREAM_INTERVAL_ENV)
    if raw is None or not raw.strip():
        return cfg.serve.stream_interval_ms / 1000
    try:
        ms = float(raw)
    except ValueError:
        ms = -1.0
    if not 0 <= ms <= 1000:
        raise UserError(f"${STREAM_INTERVAL_ENV}: '{raw}' is not a number of milliseconds from 0 to 1000",
                        hint=f"unset it to use serve.stream_interval_ms ({cfg.serve.stream_interval_ms})")
    return ms / 1000


def cpu_threads(cfg: BuildConfig) -> int:
    """ONNX Runtime's intra-op threads for a server on the CPU: ``serve.cpu_threads``, else every core but one (at
    least one), which the event loop keeps for HTTP while the scheduler's thread runs the graphs."""
    if cfg.serve.cpu_threads is not None:
        return cfg.serve.cpu_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


def cpu_split(cfg: BuildConfig, backend: str,
              providers: Sequence[str] = ()) -> Optional[Tuple[FrozenSet[int], FrozenSet[int]]]:
    """Where a server on the CPU runs its two busy threads (``serve.cpu_affinity``).

    Args:
        cfg: the build config (``serve.cpu_affinity``; ``$AUTOGLM_BUILD_CPU_AFFINITY``, 1 or 0, overrides it).
        backend: the backend's name; only ``onnxruntime`` is pinned.
        providers: its ONNX Runtime providers (a CUDA provider: not on the CPU, not pinned).

    Returns:
        ``(the scheduler's cores, the event loop's core)``: every core the process may use but the last, and the last
        (the one ``cpu_threads`` leaves to HTTP); None where the OS places the threads (TensorRT or a GPU provider, one
        core, no ``sched_setaffinity``, or off). On two cores that is every busy thread; with more, ONNX Runtime's
        own intra-op pool threads are placed on the scheduler's cores as the sessions open
        (:func:`~autoglm_build.runtime.backends.intra_op_affinities`).
    """
    if backend != "onnxruntime" or "CUDAExecutionProvider" in providers \
            or not _switch(cfg, CPU_AFFINITY_ENV, "cpu_affinity") or not hasattr(os, "sched_setaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None
    return frozenset(cores[:-1]), frozenset(cores[-1:])


def cuda_graphs(cfg: BuildConfig) -> bool:
    """Whether decode steps run as CUDA graphs (TensorRT, one GPU): ``$AUTOGLM_BUILD_CUDA_GRAPHS`` (1 or 0),
    else ``serve.cuda_graphs``."""
    return _switch(cfg, CUDA_GRAPHS_ENV, "cuda_graphs")


def device_select(cfg: BuildConfig) -> bool:
    """Whether decode steps' tokens are chosen on the GPU (TensorRT, one GPU): ``$AUTOGLM_BUILD_DEVICE_SELECT`` (1 or
    0), else ``serve.device_select``."""
    return _switch(cfg, DEVICE_SELECT_ENV, "device_select")


def build_state(cfg: BuildConfig, workdir: Path, backend: str = "auto", precision: Optional[str] = None,
                api_key: Optional[str] = None, max_batch: Optional[int] = None,
                queue_size: Optional[int] = None, devices: Optional[List[int]] = None) -> ServerState:
    """Everything the app needs, loaded and checked (one-line UserErrors for what is missing).

    ``devices`` (``--devices``, else ``serve.devices``): the GPUs the decoder's stages are placed on
    (:class:`~autoglm_build.runtime.backends.TensorRTBackend`); None: the current GPU, as ever."""
    from autoglm_build.calibration import tokenizer_for

    for needed in ("embed", "decoder"):
        if needed not in cfg.modules:
            raise UserError(f"config modules: '{needed}' is needed to serve; modules are {', '.join(cfg.modules)}")
    modules = list(cfg.modules)
    interval = stream_interval(cfg)  # a bad override refused before any engine loads
    _switch(cfg, CPU_AFFINITY_ENV, "cpu_affinity")  # likewise
    # vision/audio are optional: without them, requests with images/audio get a 400 naming the module
    origin = "--devices" if devices is not None else "serve.devices"
    devices = devices if devices is not None else cfg.serve.devices
    # the scheduler's cores should the backend be ONNX Runtime on the CPU: its intra-op pool is placed on them as its
    # sessions open (a backend on the GPU leaves them; the split below is then None)
    planned = cpu_split(cfg, "onnxruntime")
    runtime = open_backend(workdir, modules, backend, precision, optional=("vision", "audio"), devices=devices,
                           origin=origin, threads=cpu_threads(cfg), cores=planned[0] if planned else None)
    try:
        tokenizer = ChatTokenizer(tokenizer_for(cfg)[0], cfg.text.vocab_size)
        scheduler = Scheduler(runtime, cfg, tokenizer, max_batch or cfg.serve.max_batch,
                              cfg.serve.queue_size if queue_size is None else queue_size, cfg.engine.context,
                              prefix_cache_bytes=prefix_cache_bytes(cfg), overlap=decode_overlap(cfg),
                              cuda_graphs=cuda_graphs(cfg), device_select=device_select(cfg))
        # the same cores the pool was placed on (read once: the process's mask could change while a model loads)
        split = planned if cpu_split(cfg, runtime.name, getattr(runtime, "providers", ())) is not None else None
    except BaseException:
        runtime.close()
        raise
    names = tuple(dict.fromkeys([cfg.serve.model_name, cfg.name]))
    return ServerState(cfg=cfg, backend=runtime, tokenizer=tokenizer, scheduler=scheduler,
                       api_key=api_key or os.environ.get(API_KEY_ENV) or None, model_ids=names,
                       stream_interval=interval, cpus=split)


def serve(state: ServerState, host: str, port: int, log_level: str = "info",
          announce: Callable[[str], None] = print) -> None:
    try:
        import uvicorn
    except ImportError:
        raise EnvironmentMissing("uvicorn is not installed here", hint="pip install fastapi uvicorn") from None
    try:
        sock = listen(host, port)
    except UserError:
        state.backend.close()
        raise
    app = create_app(state)
    _log_to_stderr(log_level)
    if state.cpus is not None:  # this thread runs the event loop: the HTTP core, and so do the threads it starts
        try:
            os.sched_setaffinity(0, state.cpus[1])
        except OSError as exc:  # a container that forbids it: the OS places the threads, as with the option off
            log.warning("serve.cpu_affinity: cannot pin the event loop to CPU %s (%s)", sorted(state.cpus[1]), exc)
            state.cpus = None
    d = state.backend.describe()
    reuse = state.scheduler.prefix.budget >> 20
    placed = ""
    if d.get("placement"):
        stages = [f"{part.rpartition('.')[2]} on GPU {gpu}" for part, gpu in d["placement"].items()
                  if part.startswith("decoder")]
        placed = f", {', '.join(stages)}"
    announce(f"serving {', '.join(state.model_ids)} on http://{host}:{port} ({d['backend']} {d['precision']}{placed}, "
             f"max batch {state.scheduler.max_batch}, context {state.scheduler.context}, "
             f"prefix cache {f'{reuse} MiB' if state.scheduler.prefix.enabled else 'off'}, "
             f"decode overlap {'on' if state.scheduler.overlapping else 'off'}, "
             f"CUDA graphs {'on' if state.scheduler.graphing else 'off'}, "
             f"tokens chosen on the {'GPU' if state.scheduler.selecting else 'host'}"
             f"{cores_line(state.cpus)}"
             f"{', API key required' if state.api_key else ''})")
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=None,
                            access_log=log_level == "debug")
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal to the handler that was installed
    # before it: make that a no-op, so a drained server exits 0 instead of dying by the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    # what loading made (the engines' Python objects, the app, the libraries) stays: out of the collector's
    # generations, so a full collection while serving walks only what serving made (the scheduler's thread
    # runs the collections its allocations trigger, between engine calls)
    gc.collect()
    gc.freeze()
    uvicorn.Server(config).run(sockets=[sock])


def cores_line(cpus: Optional[Tuple[FrozenSet[int], FrozenSet[int]]]) -> str:
    """The announce line's part for :func:`cpu_split`'s cores (empty where the OS places the threads)."""
    if cpus is None:
        return ""
    engine, http = (",".join(str(c) for c in sorted(part)) for part in cpus)
    return f", scheduler on CPU {engine}, HTTP on CPU {http}"


def _log_to_stderr(level: str) -> None:
    """The scheduler's log lines (``autoglm_build.serve``: prefix cache counters) on stderr beside uvicorn's."""
    logger = logging.getLogger("autoglm_build.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level.upper())


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound here rather than by uvicorn, whose failure to bind is a log line
    and exit 3 (this tool's accuracy code): a port in use is one line, exit 2.

    Raises:
        UserError: the address does not resolve or cannot be bound.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise UserError(f"--host {host}: cannot listen there ({exc.strerror or exc})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UserError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror or exc})",
                        hint="pass a free --port (serve.port in the config)") from None
    return sock
