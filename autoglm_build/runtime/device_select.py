"""Token selection on the GPU (issue 14): the select graph (:mod:`~autoglm_build.runtime.select`) as a TensorRT
engine that runs right after the decoder's last part, on its logits, so the next decode step's ids never leave the
GPU and that step can be launched before the host has this one's tokens.

- **The engine** is built by the server when it starts, from the graph for this build's vocabulary width, ``k`` and
  batch bound, FP32, and kept in the TensorRT cache directory (``$AUTOGLM_BUILD_CACHE_DIR``, else the user cache dir)
  under a key of the graph's bytes, the TensorRT version, the GPU's compute capability and the rows: built once per
  machine, never half written (written beside, then renamed). It is not a build artifact: nothing of the build
  changes, and every TensorRT version the tool supports builds it in seconds.
- **Per slot, on the GPU** (allocated once, ``slots`` rows): the row's ``bias`` and ``counts`` over the vocabulary,
  its ``params`` and ``state``, its ``noise``; the ``ids`` the decode step's embed engine reads (``input_ids``, the
  engine's own integer type). The engine writes the ids there, and ``counts_out``/``state_out`` into buffers of their
  own, copied back device to device after it (TensorRT does not promise an output bound over its own input).
- **The host** uploads a row's tables only when the row's slot changes hands (a prefilled row joins, a row moves
  down: :meth:`put`), from the scheduler's own account of its tokens (``Sampler.device_row``); between, the engine
  moves the counts and the state itself, token by token, as the host's bookkeeping does. Per step it uploads the
  noise (``k`` numbers per sampled row, from the request's own generator) and downloads the ids (4 bytes a row)
  into page-locked memory, asynchronously, behind an event: taking a step's ids waits for that step only, not for
  the one launched after it.

One GPU only (the decoder's parts and ``embed`` on one stream), as CUDA graphs: with the decoder's stages on several
GPUs the server samples on the host, and says so.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from autoglm_build.manifest import atomic_write_bytes
from autoglm_build.runtime.device import Device
from autoglm_build.runtime.select import INPUTS, gumbel, select_graph

log = logging.getLogger(__name__)
NAME = "select"  # the engine's name among the backend's runners: select.<rows>.<k>


class GumbelNoise:
    """A sampled request's Gumbel numbers for the select engine, ``k`` a step, from the request's own generator.

    Drawn :attr:`BLOCK` steps at a time: one ``random`` call and one transform for 32 steps instead of one of each a
    step, which the host paid for every sampled row of every step (py-spy on the H200's tiny server: about a fifth of
    the scheduler's time in a decode step). The numbers are the same as drawing a step at a time: a generator fills an
    array in order, one double each, so ``random((32, k))`` is 32 ``random(k)`` calls in a row. :meth:`mark` and
    :meth:`rewind` put the stream back where it was (a step that failed runs again on the same noise), the generator
    too: the block it drew next is drawn again, the same.
    """

    BLOCK = 32

    def __init__(self, rng: Any, k: int) -> None:
        self.rng, self.k = rng, k
        self.block: Optional[np.ndarray] = None  # float32 (BLOCK, k), taken a row at a time
        self.at = 0  # the block's next row
        self.after: Any = None  # the generator's state right after drawing ``block``

    def take(self) -> np.ndarray:
        """The next step's ``k`` numbers (float32)."""
        if self.block is None or self.at == len(self.block):
            self.block = gumbel(self.rng, self.BLOCK, self.k)
            self.after = self.rng.bit_generator.state
            self.at = 0
        self.at += 1
        return self.block[self.at - 1]

    def mark(self) -> Tuple[Optional[np.ndarray], int, Any]:
        """Where the stream is (for :meth:`rewind`)."""
        return self.block, self.at, self.after if self.block is not None else self.rng.bit_generator.state

    def rewind(self, mark: Tuple[Optional[np.ndarray], int, Any]) -> None:
        """Back to ``mark``: the same numbers come next, and after the block, the same block."""
        self.block, self.at, state = mark
        self.after = state if self.block is not None else None
        self.rng.bit_generator.state = state


def select_problem(backend: Any, cache: Any) -> Optional[str]:
    """Why the select engine cannot run after this backend's decoder (None: it can)."""
    if len(getattr(cache, "shards", ())) != 1:
        return f"the decoder on {len(getattr(cache, 'shards', ()))} GPUs (one GPU only)"
    if np.dtype(cache.logits_dtype) not in (np.dtype(np.float32), np.dtype(np.float16)):
        return f"logits of {cache.logits_dtype}"
    return None


def engine_path(backend: Any, k: int, vocab: int, close: int, logits_dtype: Any, rows: int) -> Path:
    """The select engine for these shapes on this GPU and TensorRT, built here first if no earlier server did."""
    from autoglm_build.engine import tensorrt as trt_env
    from autoglm_build.stages.engine import build_isolated

    trt = trt_env.load()
    model = select_graph(k, vocab, close, logits_dtype)
    data = model.SerializeToString()
    capability = backend.compute_capability_of("decoder")
    key = hashlib.sha256(data + f"|{trt.__version__}|{capability}|{rows}".encode()).hexdigest()[:16]
    folder = trt_env.cache_dir() / "select"
    folder.mkdir(parents=True, exist_ok=True)
    engine, graph = folder / f"select-{key}.engine", folder / f"select-{key}.onnx"
    if engine.is_file():
        return engine
    atomic_write_bytes(graph, data)
    shapes = {name: ((1, *dims), (rows, *dims), (rows, *dims)) for name, dims in
              ((name, _dims(shape, vocab, k)) for name, shape in INPUTS)}
    log.info("select engine: building it for %d rows x %d ids, k %d (TensorRT %s; once per machine)", rows, vocab, k,
             trt.__version__)
    # no preview features: TensorRT 8.5's FASTER_DYNAMIC_SHAPES_0805 (the decoders' default there) aborts on this graph
    # at the 9B's 151,552-id vocabulary (a Myelin DCHECK, seen on an H200); without it the engine builds in 12 s
    built = build_isolated(graph, "fp32", [shapes], 1024, folder / f"select-{key}.timing", folder, preview=[],
                           device=backend.placement_of("decoder"))
    atomic_write_bytes(engine, built)
    return engine


def _dims(shape: Sequence[Any], vocab: int, k: int) -> Tuple[int, ...]:
    return tuple(vocab if d == "vocab" else k if d == "k" else int(d) for d in shape[1:])


class DeviceSelect:
    """The select engine and its per-slot tables on the cache's GPU (module docstring).

    Args:
        backend: the TensorRT backend (loads the engine beside the decoder: :meth:`TensorRTBackend.load_engine`).
        cache: the :class:`~autoglm_build.runtime.device_cache.DeviceKVCache` whose decode steps it follows.
        close: ``</think>``'s id.
        k: candidates a sampled row draws from (``serve.select_k``).
    """

    def __init__(self, backend: Any, cache: Any, close: int, k: int) -> None:
        self.backend, self.cache, self.k = backend, cache, k
        self.device: Device = cache.device
        self.slots, self.vocab = cache.slots, cache.vocab
        # the engine takes as many rows as the backend's decoder does: every cache of the backend shares it
        rows = max(self.slots, backend.max_batch or 0)
        self.name = f"{NAME}.{rows}.{k}"
        path = engine_path(backend, k, self.vocab, close, cache.logits_dtype, rows)
        backend.load_engine(self.name, path, like="decoder")
        self.ids_dtype = np.dtype(backend.dtypes[self.name]["ids"])
        if self.ids_dtype != cache.ids_dtype:
            raise RuntimeError(f"select engine writes {self.ids_dtype} ids, the embed engine reads {cache.ids_dtype}")
        self.widths = {"bias": self.vocab, "counts": self.vocab, "counts_out": self.vocab, "params": 4, "state": 2,
                       "state_out": 2, "noise": k}
        self.ptrs = {}
        self._hosts: List[int] = []
        self._events: List[Any] = []
        try:
            for name, width in self.widths.items():
                self.ptrs[name] = self.device.malloc(self.slots * width * 4)
                self.device.memset(self.ptrs[name], self.slots * width * 4)
            self.ptrs["ids"] = self.device.malloc(self.slots * self.ids_dtype.itemsize)
            self.device.memset(self.ptrs["ids"], self.slots * self.ids_dtype.itemsize)
            # page-locked memory in two turns, a step's and the one launched after it: where each step's ids land,
            # with its event, and where its noise is drawn (an upload from it runs when the stream gets there)
            for _ in range(2):
                self._hosts.append(self.device.host_alloc(self.slots * self.ids_dtype.itemsize))
                self._events.append(self.device.event())
                self._hosts.append(self.device.host_alloc(self.slots * k * 4))
        except BaseException:
            self.close()
            raise
        self._turn = 0
        self._ptr_key = tuple(sorted(self.ptrs.items()))
        self.noise_host = [np.ctypeslib.as_array((np.ctypeslib.ctypes.c_float * (self.slots * k)).from_address(
            self._hosts[2 * t + 1])).reshape(self.slots, k) for t in range(2)]

    def put(self, slot: int, bias: np.ndarray, counts: np.ndarray, params: np.ndarray, state: np.ndarray,
            token: int) -> None:
        """Row ``slot``'s tables and its next step's id, uploaded (the row joined or moved there)."""
        for name, value in (("bias", bias), ("counts", counts), ("params", params), ("state", state)):
            host = np.ascontiguousarray(value, np.float32)
            self.device.upload(self.ptrs[name] + slot * self.widths[name] * 4, host)
        self.device.upload(self.ptrs["ids"] + slot * self.ids_dtype.itemsize, np.array([token], self.ids_dtype))

    def put_ids(self, ids: np.ndarray) -> None:
        """The next step's ids of slots ``0..len(ids)`` from the host (a step run again after a failure)."""
        self.device.upload(self.ptrs["ids"], np.ascontiguousarray(ids.reshape(-1), self.ids_dtype))

    def noise(self, n: int, rows: Sequence[Tuple[int, GumbelNoise]]) -> None:
        """The next step's noise: for each ``(slot, stream)`` of a sampled row its stream's next ``k`` Gumbel numbers
        (:class:`GumbelNoise`: from the request's own generator), zeros elsewhere; uploaded from this turn's page-locked
        memory, which the step two launches back read (taken already: the scheduler launches a step only after the
        one two back is taken)."""
        host = self.noise_host[self._turn][:n]
        host[:] = 0.0
        for slot, stream in rows:
            host[slot] = stream.take()
        self.device.upload(self.ptrs["noise"], host)

    def enqueue(self, n: int, logits: int, queue: Optional[List]) -> None:
        """The engine over slots ``0..n`` after the decoder wrote ``logits`` (added to ``queue``: a CUDA graph's runs,
        or run now with ``queue`` None)."""
        p = self.ptrs
        key = (self.name, n, logits, self._ptr_key)  # the tables' addresses: each cache of the backend has its own
        runner = self.backend.bind(self.name, self.name, key, lambda: (
            {"logits": (n, self.vocab), "bias": (n, self.vocab), "counts": (n, self.vocab), "params": (n, 4),
             "state": (n, 2), "noise": (n, self.k)},
            {"logits": logits, "bias": p["bias"], "counts": p["counts"], "params": p["params"], "state": p["state"],
             "noise": p["noise"], "ids": p["ids"], "counts_out": p["counts_out"], "state_out": p["state_out"]}))
        if queue is None:
            self.backend.execute(runner, self.device.stream.ptr)
        else:
            queue.append((runner, self.device.stream.ptr, key))

    def after(self, n: int) -> int:
        """What follows the engine's run on the stream: the counts and state copied back, the ids downloaded behind
        an event. Returns the landing place's turn, for :meth:`ids`."""
        self.device.copy(self.ptrs["counts"], self.ptrs["counts_out"], n * self.vocab * 4)
        self.device.copy(self.ptrs["state"], self.ptrs["state_out"], n * 2 * 4)
        turn, self._turn = self._turn, 1 - self._turn
        self.device.download_to(self._hosts[2 * turn], self.ptrs["ids"], n * self.ids_dtype.itemsize)
        self.device.record(self._events[turn])
        return turn

    def ids(self, turn: int, n: int) -> np.ndarray:
        """Slots ``0..n``'s ids of the step whose :meth:`after` gave ``turn``, once that step is done (int64)."""
        self.device.wait_event(self._events[turn])
        view = (np.ctypeslib.ctypes.c_char * (n * self.ids_dtype.itemsize)).from_address(self._hosts[2 * turn])
        return np.frombuffer(view, self.ids_dtype, n).astype(np.int64)

    def close(self) -> None:
        for ptr in self.ptrs.values():
            self.device.free(ptr)
        self.ptrs = {}
        for ptr in self._hosts:
            self.device.host_free(ptr)
        self._hosts = []
        for event in self._events:
            self.device.destroy_event(event)
        self._events = []
