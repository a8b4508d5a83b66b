"""The TensorRT backend's KV cache: FP16 slots on the GPU that never cross to the host.

The same slots as :class:`~autoglm_build.runtime.kv_cache.KVCache` (its docstring: one slot per batch row,
rows left-aligned, a decode step feeds slots ``0..top`` as they lie, capacity in pages of ~1/8), behind
the same calls the scheduler and the prefix cache make, with the memory on the device:

- **The store** is allocated once, at the engine's context (``slots x (context - 1)`` columns of every
  ``key.i``/``value.i``, in the engine's ``past_*`` dtype: FP16), and laid out at the current capacity:
  :class:`~.device.Layout` ``(planes, slots, heads, capacity, dim)`` at its start, so the first ``top``
  slots of each plane are the contiguous ``(top, heads, capacity, dim)`` array the decode context's
  ``past_*`` address points at. Re-laying at a new capacity is two device-to-device copies of the used
  rows through a scratch buffer (the layouts overlap), at most every ``capacity / 8`` steps.
- **A decode step** writes ``present_*`` into a scratch buffer and then copies each used row's new
  column into its slot (one ``cudaMemcpy3DAsync`` per run of consecutive rows whose new columns land in the
  same column, :func:`column_runs`: every head of every layer; rows that joined together stay one run). ``present_*``
  cannot be bound into the slots themselves: TensorRT writes it as a dense ``(top, heads, capacity + 1,
  dim)`` array (the graph's ``Concat`` of the past and the new column), whose line pitch is not the
  slots' and whose first ``capacity`` columns are the ``past_*`` input it would overwrite while reading.
- **Execution contexts are bound once per shape bucket**: the decode context's input shapes and
  every tensor address are set when ``(top, capacity)`` or a buffer changes, not per step
  (:meth:`TensorRTBackend.bind`). Per step only the ids and the positions go up (each committed column's
  mask element is copied on the device, one 2-D copy per run), and only the used rows' logits (the sampler's
  candidate columns) come back.
- **Prefill** chains its chunks on the device (each chunk's ``present_*`` bound as the next chunk's
  ``past_*``, two scratch buffers in turn), starts from the prefix blocks (device buffers, copied into
  the first past), embeds the ids with the ``embed`` engine into a device buffer and splices the
  encoders' embeddings into it (device to device when the encoder left them on the GPU).
- **Prefix blocks** are device buffers from a pool (``save_block`` one 3-D copy out of the slot,
  ``free_block`` back to the pool: no ``cudaFree``, which would wait for the device).

Everything runs on the backend's one stream (:class:`~.device.Device`), in order; a step waits for the
stream once, for its logits: :meth:`DeviceKVCache.decode_async` queues a step and returns, its result waits.

**On several GPUs** (the decoder's stages placed by ``serve --devices``, :mod:`~.device`) the cache is cut
into :class:`Shard` s, one per GPU: each holds the planes of the stages placed there (its own store, its
own copy of the decode mask, positions and scratch buffers), allocated and run on that GPU's stream. Every
operation above is done per shard, in the same order (on one GPU there is one shard: the same calls as
before). ``embed`` and stage 0 share the first GPU; the ``hidden_states`` a stage hands to a stage on another
GPU cross in one peer copy on the receiving stream, after an event wait on the sending one, which in turn
waits for the copy before it writes that buffer again; the logits come back from the last GPU; a step
waits for every GPU's stream before it returns.

Imports on the GPU harness's Python 3.9 without torch.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from autoglm_build.runtime.device import D2D, D2H, Buffer, Device, DeviceEmbeds, Layout, lines_for
from autoglm_build.runtime.kv_cache import CacheSpec, Chunk, KVCache, Prefix, Step, mutates


class DeviceBlock:
    """A prefix block on the device: ``tokens`` columns of every head of every cache tensor, one allocation
    per :class:`Shard` (``ptrs``, in shard order)."""

    __slots__ = ("ptrs", "tokens")

    def __init__(self, ptrs: Sequence[int], tokens: int) -> None:
        self.ptrs, self.tokens = tuple(ptrs), tokens


def device_cache_problem(backend: Any) -> Optional[str]:
    """Why the backend's engines cannot keep the cache on the device (None: they can): each buffer
    one engine writes and another reads must have one dtype, and ``present_*`` the ``past_*`` dtype."""
    units = backend.parts.get("decoder", ["decoder"])
    embed, decoder = (np.dtype(backend.dtypes[u][n]) for u, n in (("embed", "inputs_embeds"),
                                                                  (units[0], backend.inputs[units[0]][0])))
    if embed != decoder:
        return f"embed writes {embed} inputs_embeds, the decoder reads {decoder}"
    for before, after in zip(units, units[1:]):  # the activations cross stages as raw float32 bytes
        pair = (np.dtype(backend.dtypes[before]["hidden_states"]),
                np.dtype(backend.dtypes[after][backend.inputs[after][0]]))
        if pair != (np.dtype(np.float32),) * 2:
            return f"{before} writes {pair[0]} hidden_states, {after} reads {pair[1]} (float32 expected)"
    for unit in units:
        dtypes = {n: np.dtype(t) for n, t in backend.dtypes[unit].items()}
        for name in [n for n in backend.inputs[unit] if n.startswith("past_")]:
            present = "present_" + name[len("past_"):]
            if dtypes[present] != dtypes[name]:
                return f"{unit} reads {name} as {dtypes[name]} and writes {present} as {dtypes[present]}"
    return None


def column_runs(used: Sequence[int], lengths: np.ndarray) -> List[Tuple[int, int, int]]:
    """``used`` (ascending row indices) as runs ``(first row, rows, column)`` of consecutive rows whose
    ``lengths`` (the column each row's new column goes to) are equal: one copy commits a run."""
    runs: List[Tuple[int, int, int]] = []
    for k in used:
        at = int(lengths[k])
        if runs and runs[-1][0] + runs[-1][1] == k and runs[-1][2] == at:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, at)
        else:
            runs.append((k, 1, at))
    return runs


class Shard:
    """The cache's part on one GPU: the ``key.i``/``value.i`` planes of the decoder stages placed there
    (``names``, in the cache's order), its copy of the decode mask, its scratch buffers and prefix-block
    allocations, all on ``device`` and its stream."""

    def __init__(self, device: Device, units: List[str], names: List[str]) -> None:
        self.device, self.units, self.names = device, units, names
        self.planes = {name: z for z, name in enumerate(names)}
        self.store_ptr, self.mask_ptr, self.one_ptr = 0, 0, 0  # one_ptr: a scratch buffer (freed with them)
        self.buffers: Dict[str, Buffer] = {}
        self.blocks: List[int] = []  # every prefix block allocated here

    def buffer(self, name: str, nbytes: int) -> int:
        """The scratch buffer ``name`` with room for ``nbytes``."""
        if name not in self.buffers:
            self.buffers[name] = Buffer(self.device)
        return self.buffers[name].ensure(nbytes)

    def close(self) -> None:
        for buffer in self.buffers.values():
            buffer.free()
        for ptr in [self.store_ptr, self.mask_ptr] + self.blocks:
            self.device.free(ptr)
        self.store_ptr, self.mask_ptr, self.blocks = 0, 0, []


class StepGraphs:
    """A decode step's engine runs (embed, then each decoder part, on the one GPU's stream) replayed as one CUDA
    graph, instead of one ``execute_async_v3`` per engine from Python.

    Everything else of the step stays outside the graph, on the same stream in the same order: the uploads
    before it (ids, positions: pageable copies cannot be captured) and the commits after it (each row's new
    column goes to a column that moves every step, so those copies would not replay). A graph is keyed by its
    runs' bindings (each engine's shapes and tensor addresses, :meth:`TensorRTBackend.bind`'s key) and by how
    often each context has been bound (``backend.generations``): any re-binding, even back to the same shapes,
    makes a new key, as TensorRT may reallocate what an earlier capture recorded. So in practice one graph is
    live at a time: a change of rows or capacity, or a prefill (which binds the embed context the decode step
    shares), makes the graphs before it stale, and the next binding is captured anew. TensorRT 8.5's rule (its
    ``enqueueV2`` header; trtexec does the same): the first enqueue after a shape change cannot be captured, so
    a binding runs engine by engine once and is captured the next step it comes back unchanged. The runs are
    recorded on the GPU's own non-blocking capture stream and the graph launched on the serving stream, which
    an encoder may use from its request's thread during a capture. A capture or launch that CUDA or TensorRT
    refuses runs that step engine by engine and refuses its binding; after :data:`MAX_FAILURES` refusals in a
    row, or a CUDA runtime without the graph API, graphs are off for the cache (logged once). Single GPU only
    (:meth:`DeviceKVCache.use_graphs`). On by default (``serve.cuda_graphs``) since the GPU ran it (same tokens,
    no capture refused; docs/benchmarks.md, sixth session).
    """

    MAX_FAILURES = 3

    def __init__(self, backend: Any, device: Device, keep: int = 4) -> None:
        self.backend, self.device, self.keep = backend, device, keep
        self.graphs: Dict[Tuple, int] = {}  # key -> executable graph, oldest first
        self.refused: set = set()
        self.disabled: Optional[str] = None  # why graphs are off for good
        self._warm: Optional[Tuple] = None  # the key the last step ran without a graph
        self._failed_in_row = 0
        self.captures = self.launches = self.failures = 0

    def key(self, queue: Sequence[Tuple[Any, int, Any]]) -> Tuple:
        return tuple((runner.name, stream, bound, self.backend.generations.get(runner.name, 0))
                     for runner, stream, bound in queue)

    def run(self, queue: Sequence[Tuple[Any, int, Any]]) -> None:
        """Enqueue ``queue``'s engine runs (``(runner, stream, binding key)``, bound already): its graph's launch,
        or a capture then a launch, or the runs one by one."""
        if self.disabled is None:
            key = self.key(queue)
            graph = self.graphs.get(key)
            if graph is None and self._warm == key and key not in self.refused:
                graph = self._capture(key, queue)
            if graph is not None and self._launch(key, graph):
                return
            self._warm = key
        for runner, stream, _ in queue:
            self.backend.execute(runner, stream)

    def _launch(self, key: Tuple, graph: int) -> bool:
        try:
            self.device.launch(graph)
        except (RuntimeError, OSError) as exc:  # nothing of it was enqueued: the step runs engine by engine
            self.device.destroy_graph(self.graphs.pop(key))
            self._refuse(key, exc)
            return False
        self.launches += 1
        self._failed_in_row = 0
        return True

    def _capture(self, key: Tuple, queue: Sequence[Tuple[Any, int, Any]]) -> Optional[int]:
        """The runs recorded on the GPU's own capture stream (an encoder may enqueue on the serving stream from
        its request's thread meanwhile: that must neither land in the graph nor break the capture)."""
        try:
            stream = self.device.begin_capture()
        except AttributeError as exc:  # a CUDA runtime without the graph API (before 11.4): off for good
            return self._refuse(key, exc, for_good=True)
        except (RuntimeError, OSError) as exc:
            return self._refuse(key, exc)
        try:
            for runner, _, _ in queue:
                self.backend.execute(runner, stream)
        except BaseException as exc:
            try:
                self.device.destroy_graph(self.device.end_capture())  # out of capture mode; nothing kept
            except (RuntimeError, OSError, AttributeError):
                pass
            if not isinstance(exc, (RuntimeError, OSError)):
                raise
            return self._refuse(key, exc)
        try:
            graph = self.device.end_capture()
        except AttributeError as exc:
            return self._refuse(key, exc, for_good=True)
        except (RuntimeError, OSError) as exc:
            return self._refuse(key, exc)
        self._forget_stale(key)
        self.graphs[key] = graph
        self.captures += 1
        return graph

    def _refuse(self, key: Tuple, exc: BaseException, for_good: bool = False) -> None:
        import logging

        log = logging.getLogger(__name__)
        if not self.refused:
            log.warning("decode step not run as a CUDA graph (%s); it runs engine by engine", exc)
        self.refused.add(key)
        self.failures += 1
        self._failed_in_row += 1
        if for_good or self._failed_in_row >= self.MAX_FAILURES:
            self.disabled = f"{type(exc).__name__}: {exc}"
            log.warning("CUDA graphs off for this server after %d refusals (last: %s)", self._failed_in_row, exc)
            self.close()
            self.refused = set()
        return None

    def _forget_stale(self, key: Tuple) -> None:
        """Destroy graphs over a context bound since (a stale generation) and the oldest beyond ``keep``."""
        current = {name: gen for name, _, _, gen in key}
        for old in list(self.graphs):
            stale = any(current.get(name, gen) != gen for name, _, _, gen in old)
            if stale or len(self.graphs) >= self.keep:
                self.device.destroy_graph(self.graphs.pop(old))

    def describe(self) -> Dict[str, Any]:
        return {"graphs": len(self.graphs), "captures": self.captures, "launches": self.launches,
                "refused": self.failures, "off": self.disabled is not None}

    def close(self) -> None:
        for graph in self.graphs.values():
            self.device.destroy_graph(graph)
        self.graphs = {}


def shards_of(backend: Any, spec: CacheSpec) -> List[Shard]:
    """The decoder's units grouped by the :class:`~.device.Device` each runs on (consecutive stages share a
    GPU; one GPU: one shard holding every plane), each with its stages' cache names."""
    shards: List[Shard] = []
    for unit in backend.parts.get("decoder", ["decoder"]):
        device = backend.device_for(unit)
        if not shards or shards[-1].device is not device:
            shards.append(Shard(device, [], []))
        shards[-1].units.append(unit)
        shards[-1].names.extend(n[len("past_"):] for n in backend.inputs[unit] if n.startswith("past_"))
    for shard in shards:
        own = set(shard.names)
        shard.names = [n for n in spec.names if n in own]
        shard.planes = {name: z for z, name in enumerate(shard.names)}
    return shards


class DeviceKVCache(KVCache):
    """The KV cache on the GPU(s) for :class:`~autoglm_build.runtime.backends.TensorRTBackend` (module
    docstring). Same arguments as :class:`KVCache`; ``backend.device_for(unit)`` is the stream each unit runs
    on, ``device`` the first GPU's (``embed``, stage 0, the encoders' embeddings)."""

    asynchronous = True  # decode_async queues the step and returns
    # a new capacity binds every engine context again and, with CUDA graphs, costs a step engine by engine and a
    # capture: grown 64 columns at least, a 128-token answer after a short prompt re-lays 3 times, not 8 (py-spy on the
    # H200's tiny server: a tenth of its decode time in those steps and captures at 16); the columns it adds are
    # masked, and at short lengths cheap
    min_page = 64

    def __init__(self, backend: Any, spec: CacheSpec, slots: int, context: int, dtype: Any) -> None:
        self.units: List[str] = list(backend.parts.get("decoder", ["decoder"]))
        self.shards = shards_of(backend, spec)
        self.shard_of = {unit: shard for shard in self.shards for unit in shard.units}
        self.device: Device = self.shards[0].device
        if backend.device_for("embed") is not self.device:
            raise RuntimeError("device KV cache: embed and the decoder's first stage must share a GPU")
        self.column_bytes = spec.head_dim * np.dtype(dtype).itemsize
        d = backend.dtypes
        last = d[self.units[-1]]
        self.mask_dtype = np.dtype(d[self.units[0]]["attention_mask"])
        self.position_dtype = np.dtype(d[self.units[0]]["position_ids"])
        self.ids_dtype = np.dtype(d["embed"]["input_ids"])
        self.embeds_dtype = np.dtype(d["embed"]["inputs_embeds"])
        self.logits_dtype = np.dtype(last["logits"])
        self.hidden = int(backend.shapes["embed"]["inputs_embeds"][-1])
        self.vocab = int(backend.shapes[self.units[-1]]["logits"][-1])
        self.logit_columns: Optional[Tuple[int, int]] = None  # the sampler's candidate ids, lo..hi
        self._pool: Dict[int, List[Tuple[int, ...]]] = {}  # tokens -> free prefix blocks (one pointer per shard)
        self._mask_rows: set = set()
        self._mask_all = True
        self.graphs: Optional[StepGraphs] = None  # decode steps as CUDA graphs (use_graphs)
        self.selector: Optional[Any] = None  # the select engine after each decode step (use_select)
        self._one = np.ones(slots, self.mask_dtype)
        try:
            # the largest layout: every capacity's plane (lines padded for alignment) fits in it
            width = (context - 1) * self.column_bytes
            for shard in self.shards:
                size = len(shard.names) * width * lines_for(slots * spec.kv_heads, self.column_bytes)
                shard.store_ptr = shard.device.malloc(size)
                # once: masked columns are read (times a zero weight); never let them hold NaN bit patterns
                shard.device.memset(shard.store_ptr, size)
                shard.mask_ptr = shard.device.malloc(slots * context * self.mask_dtype.itemsize)
                # a mask element of 1 per slot kept on the GPU, the source of the committed columns' mask elements:
                # a pageable host-to-device copy may wait for the stream, a device copy does not
                shard.one_ptr = shard.buffer("one", self._one.nbytes)
                shard.device.upload(shard.one_ptr, self._one)
            self._logits_host = np.empty((slots, self.vocab), self.logits_dtype)
            super().__init__(backend, spec, slots, context, dtype)
            self._sync()
        except BaseException:
            self.close()
            raise

    # ---- memory -------------------------------------------------------------------------------

    @property
    def traffic(self) -> Dict[str, int]:
        """Bytes and calls per copy kind on every GPU of the cache (:attr:`~.device.Device.traffic` summed)."""
        total: Dict[str, int] = {}
        for device in {id(s.device): s.device for s in self.shards}.values():
            for key, value in device.traffic.items():
                total[key] = total.get(key, 0) + value
        return total

    def layout(self, shard: Shard, ptr: int, rows: int, columns: int) -> Layout:
        return Layout(ptr, len(shard.names), rows, self.spec.kv_heads, columns, self.column_bytes)

    def scratch(self, shard: Shard, name: str, rows: int, columns: int) -> Layout:
        """A ``(planes, rows, heads, columns, dim)`` scratch layout of ``shard`` (``name``: ``a`` or ``b``)."""
        size = self.layout(shard, 0, rows, columns).nbytes
        return self.layout(shard, shard.buffer(name, size), rows, columns)

    def slots_layout(self, shard: Shard, capacity: Optional[int] = None) -> Layout:
        """``shard``'s store at ``capacity`` columns (the current capacity)."""
        return self.layout(shard, shard.store_ptr, self.slots, self.capacity if capacity is None else capacity)

    def _allocate(self, capacity: int) -> None:
        """Re-lay the slots at ``capacity`` columns (rows keep their slots): the used rows' columns go to
        a scratch buffer and back, since the two layouts share the store's memory."""
        if capacity > self.context - 1:  # the store and the mask were sized for context - 1 columns
            raise RuntimeError(f"KV cache: {capacity} columns per row asked of a device store sized for "
                               f"{self.context - 1} (engine.context {self.context})")
        keep, top = min(capacity, self.capacity), self.top
        if top and keep and capacity != self.capacity:
            for shard in self.shards:
                bounce = self.scratch(shard, "a", top, keep)
                shard.device.columns(bounce, 0, 0, self.slots_layout(shard), 0, 0, keep, rows=top)
                shard.device.columns(self.slots_layout(shard, capacity), 0, 0, bounce, 0, 0, keep, rows=top)
        self.capacity = capacity
        self._lay_mask()
        self._mask_all = True

    def _sync(self) -> None:
        """Wait for every GPU's stream."""
        for shard in self.shards:
            shard.device.sync()

    def close(self) -> None:
        """Free the device memory (the backend closes its caches)."""
        if getattr(self, "graphs", None) is not None:
            self.graphs.close()
        if getattr(self, "selector", None) is not None:
            self.selector.close()
            self.selector = None
        for shard in getattr(self, "shards", []):
            shard.close()
        self._pool = {}

    def use_graphs(self, on: bool = True) -> None:
        """Run committed decode steps as CUDA graphs (:class:`StepGraphs`), or stop. One GPU only: with the
        decoder's stages on several (their peer copies and event waits are not captured) it stays off, and says so."""
        if self.graphs is not None:
            self.graphs.close()
        self.graphs = None
        if on and len(self.shards) > 1:
            import logging

            logging.getLogger(__name__).info("CUDA graphs: off with the decoder on %d GPUs (one GPU only)",
                                             len(self.shards))
        elif on:
            self.graphs = StepGraphs(self.backend, self.device)

    def use_select(self, close: int, k: int) -> bool:
        """Choose each committed decode step's tokens on the GPU (:mod:`~.device_select`): the step's result is
        then its ids, and :meth:`decode_ahead` may launch the next step before the host has them. Where the
        engines cannot (several GPUs) or its engine does not build, the host keeps sampling, and the log says why.
        Returns whether it is on."""
        import logging

        from autoglm_build.runtime.device_select import DeviceSelect, select_problem

        problem = select_problem(self.backend, self)
        if problem is None:
            try:
                self.selector = DeviceSelect(self.backend, self, close, k)
                return True
            except Exception as exc:  # noqa: BLE001 - the host sampler serves the same requests
                problem = f"{type(exc).__name__}: {exc}"
        logging.getLogger(__name__).warning("device select: off, the host samples (%s)", problem)
        return False

    # ---- rows -------------------------------------------------------------------------------

    def _take(self, slot: int, length: int) -> None:
        super()._take(slot, length)
        self._mask_rows.add(slot)

    @mutates
    def release(self, slot: int) -> None:
        super().release(slot)
        self._mask_rows.add(slot)

    @mutates
    def move(self, source: int, target: int) -> None:
        n = int(self.lengths[source])
        for shard in self.shards:
            store = self.slots_layout(shard)
            shard.device.columns(store, target, 0, store, source, 0, n)
        self._take(target, n)
        self.release(source)

    def _flush_mask(self) -> None:
        """The host mask's changed rows up to each GPU (all of it after a re-lay)."""
        pitch = (self.capacity + 1) * self.mask_dtype.itemsize
        if self._mask_all:
            self._mask_host = np.ascontiguousarray(self.mask, self.mask_dtype)
            for shard in self.shards:
                shard.device.upload(shard.mask_ptr, self._mask_host)
        else:
            for row in sorted(self._mask_rows):
                host = np.ascontiguousarray(self.mask[row], self.mask_dtype)
                for shard in self.shards:
                    shard.device.upload(shard.mask_ptr + row * pitch, host)
        self._mask_all, self._mask_rows = False, set()

    # ---- prefix blocks ------------------------------------------------------------------------

    @mutates
    def save_block(self, slot: int, start: int, stop: int) -> DeviceBlock:
        tokens = stop - start
        free = self._pool.get(tokens)
        if free:
            ptrs = free.pop()
        else:
            ptrs = tuple(shard.device.malloc(self.layout(shard, 0, 1, tokens).nbytes) for shard in self.shards)
            for shard, ptr in zip(self.shards, ptrs):
                shard.blocks.append(ptr)
        for shard, ptr in zip(self.shards, ptrs):
            shard.device.columns(self.layout(shard, ptr, 1, tokens), 0, 0, self.slots_layout(shard), slot, start,
                                 tokens)
        return DeviceBlock(ptrs, tokens)

    @mutates
    def free_block(self, block: Any) -> None:
        self._pool.setdefault(block.tokens, []).append(block.ptrs)

    # ---- prefill ------------------------------------------------------------------------------

    @mutates
    def prefill(self, slots: Sequence[int], lengths: Sequence[int], chunks: Iterable[Chunk],
                prefixes: Optional[Sequence[Prefix]] = None) -> np.ndarray:
        n = len(slots)
        prefixes = prefixes or [Prefix((), 0)] * n
        # room first: the re-lay uses the scratch the chunks then fill (rows keep their columns)
        # (the +1 spares the next decode a re-lay; a row of context - 1 tokens takes no decode step)
        self.fit(min(max([int(self.lengths[self.used].max(initial=0))] + list(lengths)) + 1, self.context - 1))
        past, past_mask = self._past(prefixes)
        names, logits = ("a", "b"), self.shards[-1].buffer("logits", n * self.vocab * self.logits_dtype.itemsize)
        for k, chunk in enumerate(chunks):
            seq = chunk.ids.shape[1]
            present = [self.scratch(shard, names[(k + 1) % 2], n, past[0].columns + seq) for shard in self.shards]
            mask = np.ascontiguousarray(np.concatenate([past_mask, chunk.mask], axis=1), self.mask_dtype)
            self._run("prefill", n, seq, self._embed(chunk.ids, "prefill", chunk.splices), mask, chunk.positions,
                      past, present, logits)
            past = present
        width, total = past_mask.shape[1], past[0].columns
        for shard, last in zip(self.shards, past):
            store = self.slots_layout(shard)
            for k, (slot, length, prefix) in enumerate(zip(slots, lengths, prefixes)):
                p = prefix.tokens
                shard.device.columns(store, slot, 0, last, k, width - p, p)
                shard.device.columns(store, slot, p, last, k, total - (length - p), length - p)
        out = np.empty((n, self.vocab), self.logits_dtype)
        self.shards[-1].device.download(out, logits)
        self._sync()
        for slot, length in zip(slots, lengths):
            self._take(slot, length)
        return out.astype(np.float32, copy=False)

    def _past(self, prefixes: Sequence[Prefix]) -> Tuple[List[Layout], np.ndarray]:  # type: ignore[override]
        """The first chunk's past in each shard's scratch ``a``: row ``k``'s reused tokens in its last
        columns, one copy per block, zeros before them; and the mask of those columns."""
        width = max(p.tokens for p in prefixes)
        mask = np.zeros((len(prefixes), width), np.int64)
        for k, prefix in enumerate(prefixes):
            mask[k, width - prefix.tokens:] = 1
        pasts = []
        for i, shard in enumerate(self.shards):
            past = self.scratch(shard, "a", len(prefixes), width)
            if any(p.tokens < width for p in prefixes):
                shard.device.memset(past.ptr, past.nbytes)
            for k, prefix in enumerate(prefixes):
                at = width - prefix.tokens
                for block in prefix.blocks:
                    take = min(block.tokens, width - at)
                    if take <= 0:
                        break
                    shard.device.columns(past, k, at, self.layout(shard, block.ptrs[i], 1, block.tokens), 0, 0, take)
                    at += take
            pasts.append(past)
        return pasts, mask

    def _embed(self, ids: Optional[np.ndarray], phase: str, splices: Sequence[Any] = (), queue: Optional[List] = None,
               n: int = 0, selected: bool = False) -> int:
        """``ids`` (n, seq) through the embed engine into a device buffer (the first GPU's), the media spliced
        in: the encoder's device buffer copied device to device, a host array uploaded. ``queue``: the engine
        run is added to it (:class:`StepGraphs`) instead of enqueued here (the ids are uploaded either way).
        ``selected``: a committed decode step with the select engine on: the ids are the select engine's buffer
        (``ids`` uploaded into it; None: the previous step's select wrote them, ``n`` rows)."""
        n, seq = ids.shape if ids is not None else (n, 1)
        itemsize, first = self.embeds_dtype.itemsize, self.shards[0]
        out = first.buffer("embeds", n * seq * self.hidden * itemsize)
        if selected:
            ptr = self.selector.ptrs["ids"]
            if ids is not None:
                self.selector.put_ids(ids)
        else:
            host = np.ascontiguousarray(ids, self.ids_dtype)
            ptr = first.buffer("ids", host.nbytes)
            self.device.upload(ptr, host)
        key = ("embed", n, seq, ptr, out)
        runner = self.backend.bind("embed", phase, key, lambda: (
            {"input_ids": (n, seq)}, {"input_ids": ptr, "inputs_embeds": out}))
        self._execute(runner, self.device.stream.ptr, key, queue)
        for s in splices:
            at = out + (s.row * seq + s.column) * self.hidden * itemsize
            media = s.media
            if isinstance(media, DeviceEmbeds) and media.dtype == self.embeds_dtype:
                self.device.copy(at, media.ptr + s.start * self.hidden * itemsize, s.count * self.hidden * itemsize)
            else:
                self.device.upload(at, np.ascontiguousarray(np.asarray(media)[s.start:s.start + s.count],
                                                            self.embeds_dtype))
        return out

    # ---- the decoder --------------------------------------------------------------------------

    def _execute(self, runner: Any, stream: int, key: Any, queue: Optional[List]) -> None:
        if queue is None:
            self.backend.execute(runner, stream)
        else:
            queue.append((runner, stream, key))

    def _run(self, phase: str, n: int, seq: int, embeds: int, mask: Any, positions: np.ndarray,
             past: Sequence[Layout], present: Sequence[Layout], logits: int, queue: Optional[List] = None) -> None:
        """The decoder's units in turn, each on its GPU's stream: the first ``n`` rows of each shard's
        ``past``; ``mask`` a host array to upload (prefill) or each shard's device mask address (decode).
        ``queue``: as :meth:`_embed`'s (one GPU only: no peer copies between the runs)."""
        host_positions = np.ascontiguousarray(positions, self.position_dtype)
        inputs = []  # per shard: (mask, positions) addresses
        for i, shard in enumerate(self.shards):
            pos_ptr = shard.buffer(f"positions-{phase}", host_positions.nbytes)
            shard.device.upload(pos_ptr, host_positions)
            if isinstance(mask, np.ndarray):
                mask_ptr = shard.buffer("mask-prefill", mask.nbytes)
                shard.device.upload(mask_ptr, mask)
            else:
                mask_ptr = mask[i]
            inputs.append((mask_ptr, pos_ptr))
        index = {id(shard): i for i, shard in enumerate(self.shards)}
        nbytes = n * seq * self.hidden * 4  # the activations cross as float32 (device_cache_problem)
        source, before = embeds, self.shards[0]
        for k, unit in enumerate(self.units):
            shard = self.shard_of[unit]
            i = index[id(shard)]
            if shard is not before:
                source = self._cross(before, shard, source, nbytes)
            target = logits if k == len(self.units) - 1 else shard.buffer(f"hidden-{k % 2}", nbytes)
            mask_ptr, pos_ptr = inputs[i]
            key = (phase, n, seq, past[i].rows, past[i].columns, past[i].ptr, present[i].ptr, source, target,
                   mask_ptr, pos_ptr)
            runner = self.backend.bind(unit, phase, key, self._binding(unit, shard, n, seq, source, target, mask_ptr,
                                                                        pos_ptr, past[i], present[i]))
            self._execute(runner, shard.device.stream.ptr, key, queue)
            source, before = target, shard

    @staticmethod
    def _cross(before: Shard, after: Shard, source: int, nbytes: int) -> int:
        """``hidden_states`` from ``before``'s GPU into ``after``'s buffer ``hidden-in``: one peer copy on
        ``after``'s stream once ``before``'s stage has written them; ``before``'s stream then waits for the
        copy, so nothing it runs later overwrites ``source`` while the copy reads it."""
        target = after.buffer("hidden-in", nbytes)
        after.device.wait_for(before.device)
        after.device.peer(target, source, nbytes, before.device)
        before.device.wait_for(after.device)
        return target

    def _binding(self, unit: str, shard: Shard, n: int, seq: int, source: int, target: int, mask_ptr: int,
                 pos_ptr: int, past: Layout, present: Layout) -> Callable[[], Tuple[Dict, Dict]]:
        def make() -> Tuple[Dict[str, Tuple[int, ...]], Dict[str, int]]:
            inputs = self.backend.inputs[unit]
            first = inputs[0]
            shapes = {first: (n, seq, self.hidden)}
            out = "logits" if "logits" in self.backend.shapes[unit] else "hidden_states"
            addresses = {first: source, out: target}
            if "attention_mask" in inputs:  # every stage's but the head stage's (decoder.head_stage)
                shapes.update(attention_mask=(n, past.columns + seq), position_ids=(n, 3, seq))
                addresses.update(attention_mask=mask_ptr, position_ids=pos_ptr)
            for name in inputs:
                if name.startswith("past_"):
                    z = shard.planes[name[len("past_"):]]
                    shapes[name] = (n, self.spec.kv_heads, past.columns, self.spec.head_dim)
                    addresses[name] = past.plane(z)
                    addresses["present_" + name[len("past_"):]] = present.plane(z)
            return shapes, addresses
        return make

    @mutates
    def decode(self, ids: np.ndarray, positions: np.ndarray, slot: Optional[int] = None,
               commit: bool = True) -> np.ndarray:
        """:meth:`KVCache.decode` on the device. The logits array is reused by the next call; only the
        used rows (and of them the ``logit_columns``) are filled. With the select engine on (:meth:`use_select`),
        a committed step of every row returns its ids instead: (top,) int64, one per slot."""
        if slot is None and commit:
            return self.decode_async(ids, positions).result()
        return self._logits(*self._launch(ids, positions, slot, False)[:4])

    @mutates
    def decode_async(self, ids: np.ndarray, positions: np.ndarray) -> Step:
        """:meth:`KVCache.decode_async` on the device: returns once the engines, the new columns' copies into
        the slots and the mask's elements are queued on the stream(s); ``result()`` downloads the logits
        (into pageable memory, which waits for the device: so not here) and waits for every stream. With the
        select engine on, ``result()`` waits for this step's event only and returns its ids."""
        return self._step(self._launch(ids, positions, None, True))

    def decode_ahead(self, positions: np.ndarray) -> Step:
        """The next committed decode step of every row, launched while the one before it is in flight (the only
        one): its ids are those the select engine chose at that step, on the GPU; ``positions`` as
        :meth:`decode_async`'s. Everything is queued behind the step in flight on the one stream, so nothing
        here waits for it; its result is taken first."""
        if self.selector is None or self.in_flight != 1:
            raise RuntimeError("KV cache: decode_ahead needs the select engine and exactly one step in flight")
        self.in_flight -= 1  # what the launch calls may not wait for the step in flight: the stream orders them
        try:
            launched = self._launch(None, positions, None, True)
        finally:
            self.in_flight += 1
        return self._step(launched)

    def _step(self, launched: Tuple) -> Step:
        n, logits, used, committed, turn = launched
        if turn is None:
            return Step(self, lambda: self._logits(n, logits, used, committed))

        def tokens() -> np.ndarray:
            try:
                return self.selector.ids(turn, n)
            except BaseException:
                self._take_back(committed)
                raise
        return Step(self, tokens, undo=lambda: self._take_back(committed))

    def _launch(self, ids: Optional[np.ndarray], positions: np.ndarray, slot: Optional[int],
                commit: bool) -> Tuple[int, int, List[int], List[Tuple[int, int]], Optional[int]]:
        """Queue one decode step; returns (rows run, the device logits, the used rows from the first row run,
        the (slot, column) of each new column committed, the select engine's turn or None). ``ids`` None: the
        select engine's own (:meth:`decode_ahead`)."""
        self.fit(int(self.lengths[self.used].max(initial=0)) + 1)
        self._flush_mask()
        cap, item = self.capacity, self.mask_dtype.itemsize
        stores = [self.slots_layout(shard) for shard in self.shards]
        if slot is None:  # slots 0..top as they lie: the store's planes start with them
            row, n, past, masks = 0, self.top, stores, [shard.mask_ptr for shard in self.shards]
        else:  # one row alone (the scheduler's isolation path): copied out, so every address stays aligned
            row, n, past, masks = slot, 1, [], []
            host = np.ascontiguousarray(self.mask[slot], self.mask_dtype)
            for shard, store in zip(self.shards, stores):
                past.append(self.scratch(shard, "b", 1, cap))
                shard.device.columns(past[-1], 0, 0, store, slot, 0, cap)
                masks.append(shard.buffer("mask-row", host.nbytes))
                shard.device.upload(masks[-1], host)
        selected = self.selector is not None and slot is None and commit
        present = [self.scratch(shard, "a", n, cap + 1) for shard in self.shards]
        logits = self.shards[-1].buffer("logits", n * self.vocab * self.logits_dtype.itemsize)
        # a committed step of all rows may run as a CUDA graph (StepGraphs: one GPU only, use_graphs); the
        # uploads stay outside
        queue = [] if (self.graphs is not None and slot is None and commit) else None
        self._run("decode", n, 1, self._embed(ids, "decode", queue=queue, n=n, selected=selected), masks, positions,
                  past, present, logits, queue=queue)
        if selected:
            self.selector.enqueue(n, logits, queue)
        if queue is not None:
            self.graphs.run(queue)
        used = [int(s) for s in np.flatnonzero(self.used[row:row + n])]  # rows from ``row``
        committed: List[Tuple[int, int]] = []
        turn = None
        if commit:  # each used row's new column into its slot, its mask element up
            try:
                # rows of consecutive slots whose new columns land in the same column (rows that joined together,
                # as a benchmark's do) in one 3-D copy and one 2-D copy of their mask elements
                for k, count, at in column_runs(used, self.lengths[row:row + n]):
                    s = row + k
                    for shard, store, new in zip(self.shards, stores, present):
                        shard.device.columns(store, s, at, new, k, cap, 1, rows=count)
                    self.mask[s:s + count, at] = 1
                    committed += [(s + j, at) for j in range(count)]
                    self.lengths[s:s + count] += 1
                    for shard in self.shards:  # device to device from 1s kept there: never waits on the host
                        shard.device.copy2d(shard.mask_ptr + (s * (cap + 1) + at) * item, (cap + 1) * item,
                                            shard.one_ptr, item, item, count, D2D)
                if selected:
                    turn = self.selector.after(n)
            except BaseException:  # a launch that raised halfway: the rows it committed are taken back
                self._take_back(committed)
                raise
        return n, logits, used, committed, turn

    def _take_back(self, committed: Sequence[Tuple[int, int]]) -> None:
        """Lengths and mask as before the step's commits (the device's mask rows re-sent at the next flush)."""
        for s, at in committed:  # in any order: two steps' columns taken back leave the first's length
            self.lengths[s], self.mask[s, at] = min(int(self.lengths[s]), at), 0
            self._mask_rows.add(s)

    def _logits(self, n: int, ptr: int, used: List[int], committed: List[Tuple[int, int]]) -> np.ndarray:
        """The step's logits on the host once every stream is done. If that raises, the committed columns are
        taken back (lengths and mask as before the step), so the step can be run again."""
        out = self._logits_host[:n]
        try:
            self._download_rows(out, ptr, used)
            self._sync()
        except BaseException:
            self._take_back(committed)
            raise
        return out if self.logits_dtype == np.float32 else out.astype(np.float32)

    def _download_rows(self, host: np.ndarray, ptr: int, rows: Sequence[int]) -> None:
        """Rows ``rows`` of the device logits at ``ptr`` (on the last GPU) into ``host`` (the same rows), one
        copy per run of consecutive rows, only the ``logit_columns`` of each."""
        device = self.shards[-1].device
        lo, hi = self.logit_columns or (0, self.vocab)
        item = self.logits_dtype.itemsize
        pitch = self.vocab * item
        runs: List[List[int]] = []
        for r in rows:
            if runs and runs[-1][1] == r:
                runs[-1][1] = r + 1
            else:
                runs.append([r, r + 1])
        for first, stop in runs:
            at = first * pitch + lo * item
            if (lo, hi) == (0, self.vocab):
                device.download(host[first:stop], ptr + at)
            else:
                device.copy2d(host.ctypes.data + at, pitch, ptr + at, pitch, (hi - lo) * item, stop - first, D2H)
