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
  column into its slot (one ``cudaMemcpy3DAsync`` per row: every head of every layer). ``present_*``
  cannot be bound into the slots themselves: TensorRT writes it as a dense ``(top, heads, capacity + 1,
  dim)`` array (the graph's ``Concat`` of the past and the new column), whose line pitch is not the
  slots' and whose first ``capacity`` columns are the ``past_*`` input it would overwrite while reading.
- **Execution contexts are bound once per shape bucket**: the decode context's input shapes and
  every tensor address are set when ``(top, capacity)`` or a buffer changes, not per step
  (:meth:`TensorRTBackend.bind`). Per step only the ids, the positions and one mask element per row go
  up, and only the used rows' logits (the sampler's candidate columns) come back.
- **Prefill** chains its chunks on the device (each chunk's ``present_*`` bound as the next chunk's
  ``past_*``, two scratch buffers in turn), starts from the prefix blocks (device buffers, copied into
  the first past), embeds the ids with the ``embed`` engine into a device buffer and splices the
  encoders' embeddings into it (device to device when the encoder left them on the GPU).
- **Prefix blocks** are device buffers from a pool (``save_block`` one 3-D copy out of the slot,
  ``free_block`` back to the pool: no ``cudaFree``, which would wait for the device).

Everything runs on the backend's one stream (:class:`~.device.Device`), in order; a step waits for the
stream once, for its logits.

Imports on the GPU harness's Python 3.9 without torch.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from autoglm_build.runtime.device import D2H, Buffer, Device, DeviceEmbeds, Layout, lines_for
from autoglm_build.runtime.kv_cache import CacheSpec, Chunk, KVCache, Prefix


class DeviceBlock:
    """A prefix block on the device: ``tokens`` columns of every head of every cache tensor."""

    __slots__ = ("ptr", "tokens")

    def __init__(self, ptr: int, tokens: int) -> None:
        self.ptr, self.tokens = ptr, tokens


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


class DeviceKVCache(KVCache):
    """The KV cache on the GPU for :class:`~autoglm_build.runtime.backends.TensorRTBackend` (module
    docstring). Same arguments as :class:`KVCache`; ``backend.device`` is the stream everything runs on."""

    def __init__(self, backend: Any, spec: CacheSpec, slots: int, context: int, dtype: Any) -> None:
        self.device: Device = backend.device
        self.units: List[str] = list(backend.parts.get("decoder", ["decoder"]))
        self.planes = {name: z for z, name in enumerate(spec.names)}
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
        self._store_ptr = 0
        self._buffers: Dict[str, Buffer] = {}
        self._pool: Dict[int, List[int]] = {}  # tokens -> free prefix blocks
        self._blocks: List[int] = []  # every prefix block allocated
        self._mask_rows: set = set()
        self._mask_all = True
        self._one = np.ones(1, self.mask_dtype)
        try:
            # the largest layout: every capacity's plane (lines padded for alignment) fits in it
            width = (context - 1) * self.column_bytes
            size = len(spec.names) * width * lines_for(slots * spec.kv_heads, self.column_bytes)
            self._store_ptr = self.device.malloc(size)
            # once: masked columns are read (times a zero weight); never let them hold NaN bit patterns
            self.device.memset(self._store_ptr, size)
            self._mask_ptr = self.device.malloc(slots * context * self.mask_dtype.itemsize)
            self._logits_host = np.empty((slots, self.vocab), self.logits_dtype)
            super().__init__(backend, spec, slots, context, dtype)
            self.device.sync()
        except BaseException:
            self.close()
            raise

    # ---- memory -------------------------------------------------------------------------------

    def buffer(self, name: str, nbytes: int) -> int:
        """The scratch buffer ``name`` with room for ``nbytes``."""
        if name not in self._buffers:
            self._buffers[name] = Buffer(self.device)
        return self._buffers[name].ensure(nbytes)

    def layout(self, ptr: int, rows: int, columns: int) -> Layout:
        return Layout(ptr, len(self.spec.names), rows, self.spec.kv_heads, columns, self.column_bytes)

    def scratch(self, name: str, rows: int, columns: int) -> Layout:
        """A ``(planes, rows, heads, columns, dim)`` scratch layout (``name``: ``a`` or ``b``)."""
        size = self.layout(0, rows, columns).nbytes
        return self.layout(self.buffer(name, size), rows, columns)

    def slots_layout(self) -> Layout:
        """The store at the current capacity."""
        return self.layout(self._store_ptr, self.slots, self.capacity)

    def _allocate(self, capacity: int) -> None:
        """Re-lay the slots at ``capacity`` columns (rows keep their slots): the used rows' columns go to
        a scratch buffer and back, since the two layouts share the store's memory."""
        if capacity > self.context - 1:  # the store and the mask were sized for context - 1 columns
            raise RuntimeError(f"KV cache: {capacity} columns per row asked of a device store sized for "
                               f"{self.context - 1} (engine.context {self.context})")
        keep, top = min(capacity, self.capacity), self.top
        if top and keep and capacity != self.capacity:
            old = self.slots_layout()
            bounce = self.scratch("a", top, keep)
            self.device.columns(bounce, 0, 0, old, 0, 0, keep, rows=top)
            self.capacity = capacity
            self.device.columns(self.slots_layout(), 0, 0, bounce, 0, 0, keep, rows=top)
        self.capacity = capacity
        self._lay_mask()
        self._mask_all = True

    def close(self) -> None:
        """Free the device memory (the backend closes its caches)."""
        for buffer in self._buffers.values():
            buffer.free()
        for ptr in [self._store_ptr, getattr(self, "_mask_ptr", 0)] + self._blocks:
            self.device.free(ptr)
        self._store_ptr, self._mask_ptr, self._blocks, self._pool = 0, 0, [], {}

    # ---- rows -------------------------------------------------------------------------------

    def _take(self, slot: int, length: int) -> None:
        super()._take(slot, length)
        self._mask_rows.add(slot)

    def release(self, slot: int) -> None:
        super().release(slot)
        self._mask_rows.add(slot)

    def move(self, source: int, target: int) -> None:
        n, store = int(self.lengths[source]), self.slots_layout()
        self.device.columns(store, target, 0, store, source, 0, n)
        self._take(target, n)
        self.release(source)

    def _flush_mask(self) -> None:
        """The host mask's changed rows up to the device (all of it after a re-lay)."""
        pitch = (self.capacity + 1) * self.mask_dtype.itemsize
        if self._mask_all:
            self._mask_host = np.ascontiguousarray(self.mask, self.mask_dtype)
            self.device.upload(self._mask_ptr, self._mask_host)
        else:
            for row in sorted(self._mask_rows):
                host = np.ascontiguousarray(self.mask[row], self.mask_dtype)
                self.device.upload(self._mask_ptr + row * pitch, host)
        self._mask_all, self._mask_rows = False, set()

    # ---- prefix blocks ------------------------------------------------------------------------

    def save_block(self, slot: int, start: int, stop: int) -> DeviceBlock:
        tokens = stop - start
        free = self._pool.get(tokens)
        if free:
            ptr = free.pop()
        else:
            ptr = self.device.malloc(self.layout(0, 1, tokens).nbytes)
            self._blocks.append(ptr)
        self.device.columns(self.layout(ptr, 1, tokens), 0, 0, self.slots_layout(), slot, start, tokens)
        return DeviceBlock(ptr, tokens)

    def free_block(self, block: Any) -> None:
        self._pool.setdefault(block.tokens, []).append(block.ptr)

    # ---- prefill ------------------------------------------------------------------------------

    def prefill(self, slots: Sequence[int], lengths: Sequence[int], chunks: Iterable[Chunk],
                prefixes: Optional[Sequence[Prefix]] = None) -> np.ndarray:
        n = len(slots)
        prefixes = prefixes or [Prefix((), 0)] * n
        # room first: the re-lay uses the scratch the chunks then fill (rows keep their columns)
        # (the +1 spares the next decode a re-lay; a row of context - 1 tokens takes no decode step)
        self.fit(min(max([int(self.lengths[self.used].max(initial=0))] + list(lengths)) + 1, self.context - 1))
        past, past_mask = self._past(prefixes)
        names, logits = ("a", "b"), self.buffer("logits", n * self.vocab * self.logits_dtype.itemsize)
        for k, chunk in enumerate(chunks):
            seq = chunk.ids.shape[1]
            present = self.scratch(names[(k + 1) % 2], n, past.columns + seq)
            mask = np.ascontiguousarray(np.concatenate([past_mask, chunk.mask], axis=1), self.mask_dtype)
            self._run("prefill", n, seq, self._embed(chunk.ids, "prefill", chunk.splices), mask, chunk.positions,
                      past, present, logits)
            past = present
        width, total, store = past_mask.shape[1], past.columns, self.slots_layout()
        for k, (slot, length, prefix) in enumerate(zip(slots, lengths, prefixes)):
            p = prefix.tokens
            self.device.columns(store, slot, 0, past, k, width - p, p)
            self.device.columns(store, slot, p, past, k, total - (length - p), length - p)
        out = np.empty((n, self.vocab), self.logits_dtype)
        self.device.download(out, logits)
        self.device.sync()
        for slot, length in zip(slots, lengths):
            self._take(slot, length)
        return out.astype(np.float32, copy=False)

    def _past(self, prefixes: Sequence[Prefix]) -> Tuple[Layout, np.ndarray]:  # type: ignore[override]
        """The first chunk's past in scratch ``a``: row ``k``'s reused tokens in its last columns, one copy
        per block, zeros before them; and the mask of those columns."""
        width = max(p.tokens for p in prefixes)
        past = self.scratch("a", len(prefixes), width)
        mask = np.zeros((len(prefixes), width), np.int64)
        if any(p.tokens < width for p in prefixes):
            self.device.memset(past.ptr, past.nbytes)
        for k, prefix in enumerate(prefixes):
            at = width - prefix.tokens
            mask[k, at:] = 1
            for block in prefix.blocks:
                take = min(block.tokens, width - at)
                if take <= 0:
                    break
                self.device.columns(past, k, at, self.layout(block.ptr, 1, block.tokens), 0, 0, take)
                at += take
        return past, mask

    def _embed(self, ids: np.ndarray, phase: str, splices: Sequence[Any] = ()) -> int:
        """``ids`` (n, seq) through the embed engine into a device buffer, the media spliced in: the
        encoder's device buffer copied device to device, a host array uploaded."""
        n, seq = ids.shape
        itemsize = self.embeds_dtype.itemsize
        out = self.buffer("embeds", n * seq * self.hidden * itemsize)
        host = np.ascontiguousarray(ids, self.ids_dtype)
        ptr = self.buffer("ids", host.nbytes)
        self.device.upload(ptr, host)
        runner = self.backend.bind("embed", phase, ("embed", n, seq, ptr, out), lambda: (
            {"input_ids": (n, seq)}, {"input_ids": ptr, "inputs_embeds": out}))
        self.backend.execute(runner, self.device.stream.ptr)
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

    def _run(self, phase: str, n: int, seq: int, embeds: int, mask: Any, positions: np.ndarray,
             past: Layout, present: Layout, logits: int) -> None:
        """The decoder's units in turn on the stream: the first ``n`` rows of ``past``; ``mask`` a host
        array to upload (prefill) or the device mask's address (decode)."""
        host_positions = np.ascontiguousarray(positions, self.position_dtype)
        pos_ptr = self.buffer(f"positions-{phase}", host_positions.nbytes)
        self.device.upload(pos_ptr, host_positions)
        if isinstance(mask, np.ndarray):
            mask_ptr = self.buffer("mask-prefill", mask.nbytes)
            self.device.upload(mask_ptr, mask)
        else:
            mask_ptr = mask
        hidden = [self.buffer(f"hidden-{i}", n * seq * self.hidden * 4) for i in range(2)] \
            if len(self.units) > 1 else []
        source = embeds
        for k, unit in enumerate(self.units):
            target = logits if k == len(self.units) - 1 else hidden[k % 2]
            key = (phase, n, seq, past.rows, past.columns, past.ptr, present.ptr, source, target, mask_ptr, pos_ptr)
            runner = self.backend.bind(unit, phase, key, self._binding(unit, n, seq, source, target, mask_ptr, pos_ptr,
                                                                        past, present))
            self.backend.execute(runner, self.device.stream.ptr)
            source = target

    def _binding(self, unit: str, n: int, seq: int, source: int, target: int, mask_ptr: int, pos_ptr: int,
                 past: Layout, present: Layout) -> Callable[[], Tuple[Dict, Dict]]:
        def make() -> Tuple[Dict[str, Tuple[int, ...]], Dict[str, int]]:
            inputs = self.backend.inputs[unit]
            first = inputs[0]
            shapes = {first: (n, seq, self.hidden), "attention_mask": (n, past.columns + seq),
                      "position_ids": (n, 3, seq)}
            out = "logits" if "logits" in self.backend.shapes[unit] else "hidden_states"
            addresses = {first: source, "attention_mask": mask_ptr, "position_ids": pos_ptr, out: target}
            for name in inputs:
                if name.startswith("past_"):
                    z = self.planes[name[len("past_"):]]
                    shapes[name] = (n, self.spec.kv_heads, past.columns, self.spec.head_dim)
                    addresses[name] = past.plane(z)
                    addresses["present_" + name[len("past_"):]] = present.plane(z)
            return shapes, addresses
        return make

    def decode(self, ids: np.ndarray, positions: np.ndarray, slot: Optional[int] = None,
               commit: bool = True) -> np.ndarray:
        """:meth:`KVCache.decode` on the device. The logits array is reused by the next call; only the
        used rows (and of them the ``logit_columns``) are filled."""
        self.fit(int(self.lengths[self.used].max(initial=0)) + 1)
        self._flush_mask()
        cap, store, item = self.capacity, self.slots_layout(), self.mask_dtype.itemsize
        if slot is None:  # slots 0..top as they lie: the store's planes start with them
            row, n, past, mask_ptr = 0, self.top, store, self._mask_ptr
        else:  # one row alone (the scheduler's isolation path): copied out, so every address stays aligned
            row, n, past = slot, 1, self.scratch("b", 1, cap)
            self.device.columns(past, 0, 0, store, slot, 0, cap)
            host = np.ascontiguousarray(self.mask[slot], self.mask_dtype)
            mask_ptr = self.buffer("mask-row", host.nbytes)
            self.device.upload(mask_ptr, host)
        present = self.scratch("a", n, cap + 1)
        logits = self.buffer("logits", n * self.vocab * self.logits_dtype.itemsize)
        self._run("decode", n, 1, self._embed(ids, "decode"), mask_ptr, positions, past, present, logits)
        used = [int(s) for s in np.flatnonzero(self.used[row:row + n])]  # rows from ``row``
        if commit:  # each used row's new column into its slot, its mask element up
            for k in used:
                s, at = row + k, int(self.lengths[row + k])
                self.device.columns(store, s, at, present, k, cap, 1)
                self.mask[s, at] = 1
                self.device.upload(self._mask_ptr + (s * (cap + 1) + at) * item, self._one)
                self.lengths[s] += 1
        out = self._logits_host[:n]
        self._download_rows(out, logits, used)
        self.device.sync()
        return out if self.logits_dtype == np.float32 else out.astype(np.float32)

    def _download_rows(self, host: np.ndarray, ptr: int, rows: Sequence[int]) -> None:
        """Rows ``rows`` of the device logits at ``ptr`` into ``host`` (the same rows), one copy per run of
        consecutive rows, only the ``logit_columns`` of each."""
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
                self.device.download(host[first:stop], ptr + at)
            else:
                self.device.copy2d(host.ctypes.data + at, pitch, ptr + at, pitch, (hi - lo) * item, stop - first, D2H)
