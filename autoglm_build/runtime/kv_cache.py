"""The decoder's KV cache between calls: one preallocated slot per batch row, owned through the backend.

The decoder graph takes ``past_key.{i}``/``past_value.{i}`` as ``(batch, kv_heads, past, head_dim)``
and returns ``present_*`` = its input with the new tokens' keys/values appended on axis 2. A
:class:`KVCache` keeps every layer's cache as one array ``(slots, kv_heads, capacity, head_dim)`` in the
dtype the backend's graph/engine declares for ``past_*`` (FP32 or FP16):

- slot ``s`` holds one row's tokens in columns ``[0, lengths[s])`` (left-aligned; keys are stored after
  their rotary positions, so a column's place in the row does not matter, only the mask);
- a decode step feeds slots ``0..top`` as they are (the first ``top`` slots of a slot-major array are one
  contiguous block: nothing is gathered or copied), with the mask ``1`` on each row's own columns and
  on the appended column ``capacity``; afterwards each row's new column (the present's last) is written
  to column ``lengths[s]`` of its slot. Empty slots below ``top`` run as masked rows;
- a row joins by copying its prefill cache into a free slot and leaves by freeing its slot: no other
  row is copied. :meth:`move` moves one row into a lower free slot so the batch can shrink;
- ``capacity`` grows (and shrinks) in pages of about 1/8 of the longest row, so the attention the
  engine computes beyond the longest row stays under about 12 %, and re-laying the cache (the one
  whole copy) happens every ``capacity/8`` steps at most;
- :meth:`KVCache.decode_async` launches a committed step and returns a :class:`Step` whose ``result()``
  waits for its logits: on the GPU the scheduler streams the previous step's text while the step runs.
  Until then the cache refuses every call that changes it (:func:`mutates`).

Paged attention (vLLM's) would need an attention kernel that reads pages; the exported graph's
attention is standard ONNX over a dense past, which TensorRT 8.5 parses, so slots it is.

The cache also holds the memory of the prefix cache's blocks (:mod:`~autoglm_build.runtime.prefix_cache`
keeps their index): :meth:`KVCache.save_block` copies a range of a slot's columns out, and
:meth:`KVCache.prefill` starts rows from such blocks (``prefixes``), so a prompt's reused tokens never
run through the decoder. A device cache keeps its blocks on the device behind the same three calls.

:class:`KVCache` keeps host arrays and runs the graphs through :meth:`Backend.run`; it serves every
backend. ONNX Runtime's subclass binds the slots and the outputs with IOBinding, so a step allocates and
copies nothing but the new columns. A device backend (TensorRT) subclasses it with the arrays on the GPU:
what it must do is in docs/decisions.md ("The KV cache").

Imports on the GPU harness's Python 3.9 without torch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, TypeVar

import numpy as np

from autoglm_build.onnx_io import ort_float

MIN_PAGE = 16  # columns: the smallest growth step of the capacity
Method = TypeVar("Method", bound=Callable[..., Any])


class Splice(NamedTuple):
    """Media embeddings that replace a chunk's placeholder embeddings: ``media[start:start + count]`` at
    row ``row``, columns ``[column, column + count)`` of the chunk. ``media`` is a host array or, on the
    TensorRT backend, the encoder's output left on the GPU (:class:`~.device.DeviceEmbeds`)."""

    row: int
    column: int
    media: Any
    start: int
    count: int


class Chunk(NamedTuple):
    """One prefill chunk of left-padded prompts: ``ids`` (n, seq), ``mask`` (n, new tokens so far: the
    chunks' tokens, not a reused prefix, whose columns the cache adds), ``positions`` (n, 3, seq), and
    the media spliced into its embeddings. The cache embeds the ids (the ``embed`` graph/engine)."""

    ids: np.ndarray
    mask: np.ndarray
    positions: np.ndarray
    splices: Sequence[Splice] = ()


class Prefix(NamedTuple):
    """A row's reused prefix: the blocks :meth:`KVCache.save_block` made, in order, and how many of
    their tokens the row takes (at most all of them; a row may stop inside its last block)."""

    blocks: Sequence[Any]
    tokens: int


@dataclass(frozen=True)
class CacheSpec:
    """The decoder's cache geometry (from the build config's ``text`` section)."""

    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, text: Any) -> CacheSpec:
        """The geometry of a build config's ``text`` section."""
        return cls(text.num_hidden_layers, text.num_key_value_heads, text.head_dim)

    @functools.cached_property
    def names(self) -> Tuple[str, ...]:
        """``key.0``, ``value.0``, ``key.1``, ... (the graph's ``past_<name>``/``present_<name>``; made once: a decode
        step reads them several times)."""
        return tuple(f"{kind}.{i}" for i in range(self.layers) for kind in ("key", "value"))

    def bytes(self, tokens: int, itemsize: int) -> int:
        """Bytes of ``tokens`` tokens' keys and values (every layer), ``itemsize`` bytes an element."""
        return 2 * self.layers * self.kv_heads * tokens * self.head_dim * itemsize


def mutates(method: Method) -> Method:
    """A cache call that changes (or, on the device, reuses the buffers of) the cache: it raises
    ``RuntimeError`` while a decode step launched by :meth:`KVCache.decode_async` is in flight, so a
    scheduler that calls it too early fails its tests instead of corrupting rows."""
    @functools.wraps(method)
    def guarded(self: KVCache, *args: Any, **kwargs: Any) -> Any:
        if self.in_flight:
            raise RuntimeError(f"KV cache: {method.__name__} called while a decode step is in flight "
                               "(take its result first)")
        return method(self, *args, **kwargs)
    return guarded  # type: ignore[return-value]


class Step:
    """A decode step launched by :meth:`KVCache.decode_async`. Until :meth:`result` returns (or raises), the
    cache refuses every call that would change it.

    Args:
        cache: the cache it runs on (its ``in_flight`` count is raised until the result is taken).
        finish: waits for the step and returns its result (the second half of :meth:`KVCache.decode`: the logits,
            or the ids a device select chose).
        undo: takes back what a step that did run left in the cache (its committed columns), for :meth:`discard`.
    """

    def __init__(self, cache: KVCache, finish: Callable[[], np.ndarray],
                 undo: Optional[Callable[[], None]] = None) -> None:
        self.cache, self._finish, self._undo = cache, finish, undo
        self._logits: Optional[np.ndarray] = None
        self._error: Optional[BaseException] = None
        cache.in_flight += 1

    def result(self) -> np.ndarray:
        """The step's result, as :meth:`KVCache.decode` returns it (waits for the device once)."""
        if self._finish is not None:
            finish, self._finish = self._finish, None
            try:
                self._logits = finish()
            except BaseException as exc:
                self._error = exc
            finally:
                self.cache.in_flight -= 1
        if self._error is not None:
            raise self._error
        return self._logits  # type: ignore[return-value]

    def discard(self) -> None:
        """Wait for the step and leave the cache as it was before it (a step launched behind one that failed)."""
        try:
            self.result()
        except Exception:  # noqa: BLE001 - a result that raises was taken back already
            return
        if self._undo is not None:
            self._undo()


def capacity_for(need: int, limit: Optional[int] = None, min_page: int = MIN_PAGE) -> int:
    """Columns to allocate for ``need``: rounded up to a page of about ``need / 8`` (a power of two, at
    least ``min_page``), at most ``limit`` but never below ``need``."""
    page = max(min_page, 1 << max(0, (need // 8).bit_length() - 1))
    cap = -(-need // page) * page
    return max(need, min(cap, limit)) if limit else cap


class KVCache:
    """Per-slot KV cache on host arrays, run through ``backend.run`` (every backend).

    Args:
        backend: runs ``embed`` and ``decoder`` (``run(module, feed, phase)``).
        spec: layers, KV heads and head size.
        slots: batch rows (the scheduler's ``max_batch``).
        context: the longest row, prompt and generated tokens (the decode call's past stays below it).
        dtype: the dtype the decoder declares for ``past_*``.
    """

    in_flight = 0  # decode_async steps whose results are not taken yet (:func:`mutates`)
    min_page = MIN_PAGE  # the capacity's smallest growth step (capacity_for)
    # decode_async returns before the step is computed (a device cache): only then does the scheduler launch
    # steps ahead; here the step is computed first, so launching it ahead would only hold back the text
    asynchronous = False

    def __init__(self, backend: Any, spec: CacheSpec, slots: int, context: int, dtype: Any = np.float32) -> None:
        self.backend, self.spec, self.slots, self.context = backend, spec, slots, context
        self.dtype = np.dtype(dtype)
        self.lengths = np.zeros(slots, np.int64)  # tokens held per slot
        self.used = np.zeros(slots, bool)
        self.capacity = 0
        self.store: Dict[str, np.ndarray] = {}
        self.mask = np.zeros((slots, 1), np.int64)  # decode mask per slot: own columns, then the new one
        # the columns of the logits the sampler reads ([lo, hi)); a device cache copies back only those
        self.logit_columns: Optional[Tuple[int, int]] = None
        self._allocate(0)

    # ---- geometry -----------------------------------------------------------------------------

    @property
    def top(self) -> int:
        """Slots a decode step runs: up to the highest used one (read from ``used`` at each ask: subclasses and
        stand-ins write it; ``ndarray.nonzero``, not ``np.flatnonzero``'s Python wrapper, as the scheduler asks
        several times a step)."""
        used = self.used.nonzero()[0]
        return int(used[-1]) + 1 if used.size else 0

    def free_slots(self) -> List[int]:
        return [int(s) for s in np.flatnonzero(~self.used)]

    def _empty(self, slots: int, columns: int) -> np.ndarray:
        return np.zeros((slots, self.spec.kv_heads, columns, self.spec.head_dim), self.dtype)

    def _allocate(self, capacity: int) -> None:
        """Re-lay the cache at ``capacity`` columns (the one whole copy; rows keep their slots)."""
        keep = min(capacity, self.capacity)
        top = self.top
        store = {}
        for name in self.spec.names:
            array = self._empty(self.slots, capacity)
            if top and keep:
                array[:top, :, :keep] = self.store[name][:top, :, :keep]
            store[name] = array
        self.store, self.capacity = store, capacity
        self._lay_mask()

    def _lay_mask(self) -> None:
        """The decode mask at the capacity: each row's own columns and the appended one."""
        capacity = self.capacity
        self.mask = np.zeros((self.slots, capacity + 1), np.int64)
        self.mask[:, capacity] = 1
        self.mask[:, :capacity] = np.arange(capacity)[None, :] < self.lengths[:, None]

    @mutates
    def fit(self, need: int) -> None:
        """Make room for ``need`` columns per row; give back room when the longest row needs under half."""
        if need > self.capacity or (self.capacity > 4 * self.min_page and 2 * need < self.capacity):
            self._allocate(capacity_for(need, self.context - 1, self.min_page))

    # ---- rows -------------------------------------------------------------------------------

    @mutates
    def prefill(self, slots: Sequence[int], lengths: Sequence[int], chunks: Iterable[Chunk],
                prefixes: Optional[Sequence[Prefix]] = None) -> np.ndarray:
        """Run the decoder over ``chunks`` of left-padded prompts (each chunk attends to the cache the
        earlier ones wrote), then copy each row's ``lengths[k]`` tokens into slot ``slots[k]``.

        With ``prefixes``, row ``k``'s first ``prefixes[k].tokens`` tokens are not in the chunks: their
        keys/values come from the prefix blocks (:meth:`save_block`), which start the decoder's cache
        (right-aligned, masked per row), and the chunks hold the rest. A chunk's mask covers only its
        new tokens; the cache prepends the mask of its own columns.

        Returns:
            The last chunk's logits, one row per slot in ``slots``. Nothing is stored if a call raises.
        """
        past, past_mask = self._past(prefixes or [Prefix((), 0)] * len(slots))
        reused = [p.tokens for p in prefixes] if prefixes else [0] * len(slots)
        out: Dict[str, np.ndarray] = {}
        for chunk in chunks:
            out = self._run_prefill(self.embed(chunk), np.concatenate([past_mask, chunk.mask], axis=1),
                                    chunk.positions, past)
            past = {name: out[f"present_{name}"] for name in self.spec.names}
        self.fit(max([int(self.lengths[self.used].max(initial=0))] + list(lengths)) + 1)
        start, total = past_mask.shape[1], past[self.spec.names[0]].shape[2]
        for k, (slot, n, p) in enumerate(zip(slots, lengths, reused)):
            for name in self.spec.names:
                self.store[name][slot, :, :p] = past[name][k, :, start - p:start]
                self.store[name][slot, :, p:n] = past[name][k, :, total - (n - p):]
            self._take(slot, n)
        return out["logits"]

    def embed(self, chunk: Chunk) -> np.ndarray:
        """The chunk's ``inputs_embeds``: its ids through ``embed``, the media spliced in."""
        embeds = self.backend.run("embed", {"input_ids": chunk.ids}, "prefill")["inputs_embeds"]
        for s in chunk.splices:
            embeds[s.row, s.column:s.column + s.count] = np.asarray(s.media)[s.start:s.start + s.count]
        return embeds

    def _past(self, prefixes: Sequence[Prefix]) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
        """The prefill's first cache: row ``k``'s reused tokens in its last ``prefixes[k].tokens`` columns
        (from its blocks, in order), zeros before them; and the mask of those columns."""
        width = max(p.tokens for p in prefixes)
        past = {name: self._empty(len(prefixes), width) for name in self.spec.names}
        mask = np.zeros((len(prefixes), width), np.int64)
        for k, prefix in enumerate(prefixes):
            if not prefix.tokens:
                continue
            mask[k, width - prefix.tokens:] = 1
            joined = np.concatenate(list(prefix.blocks), axis=2)[:, :, :prefix.tokens]
            for j, name in enumerate(self.spec.names):
                past[name][k, :, width - prefix.tokens:] = joined[j]
        return past, mask

    # ---- prefix blocks: runtime.prefix_cache keeps the index and the policy, the cache the memory ----

    def block_bytes(self, tokens: int) -> int:
        """Bytes one block of ``tokens`` columns holds (every layer's keys and values)."""
        return self.spec.bytes(tokens, self.dtype.itemsize)

    @mutates
    def save_block(self, slot: int, start: int, stop: int) -> Any:
        """A copy of columns ``[start, stop)`` of the row in ``slot``, every layer's keys and values: here
        one host array ``(names, kv_heads, stop - start, head_dim)``; a device cache returns its own
        handle. :meth:`prefill` takes these back through ``Prefix.blocks``."""
        block = np.empty((len(self.spec.names), self.spec.kv_heads, stop - start, self.spec.head_dim), self.dtype)
        for j, name in enumerate(self.spec.names):
            block[j] = self.store[name][slot, :, start:stop]
        return block

    @mutates
    def free_block(self, block: Any) -> None:
        """The prefix cache dropped ``block`` (host arrays: the garbage collector frees them; a device
        cache returns the memory to its pool)."""

    def _take(self, slot: int, length: int) -> None:
        self.used[slot], self.lengths[slot] = True, length
        self.mask[slot, :self.capacity] = 0
        self.mask[slot, :length] = 1

    @mutates
    def release(self, slot: int) -> None:
        """The row in ``slot`` leaves; no other row moves."""
        self.used[slot], self.lengths[slot] = False, 0
        self.mask[slot, :self.capacity] = 0

    @mutates
    def move(self, source: int, target: int) -> None:
        """Move the row in ``source`` to the free slot ``target`` (one row's columns copied)."""
        n = int(self.lengths[source])
        for name in self.spec.names:
            self.store[name][target, :, :n] = self.store[name][source, :, :n]
        self._take(target, n)
        self.release(source)

    # ---- decode -----------------------------------------------------------------------------

    @mutates
    def decode(self, ids: np.ndarray, positions: np.ndarray, slot: Optional[int] = None,
               commit: bool = True) -> np.ndarray:
        """One decode step of slots ``0..top`` (or of ``slot`` alone): ``ids`` (rows, 1) and
        ``positions`` (rows, 3, 1) per slot (anything for empty slots). With ``commit`` each used slot's
        new keys/values are stored and its length grows by one; without, the cache is left as it was.

        Returns:
            logits (rows, vocab); a cache may reuse the array at its next call (ONNX Runtime's and the device
            cache do).
        """
        # the ufunc and method calls under np.max / np.flatnonzero (their Python wrappers cost more than the work)
        self.fit(int(np.maximum.reduce(self.lengths[self.used], initial=0)) + 1)
        rows = slice(0, self.top) if slot is None else slice(slot, slot + 1)
        logits, new = self._run_decode(self._embed_decode(ids), positions, rows)
        if commit:
            held = self.used[rows].nonzero()[0]  # the used rows among those run
            used = held + rows.start
            at = self.lengths[used]
            every = held.size == rows.stop - rows.start  # every row run is used: no rows to pick from the new columns
            for name in self.spec.names:
                self.store[name][used, :, at] = new[name] if every else new[name][held]
            self.mask[used, at] = 1
            self.lengths[used] += 1
        return logits

    @mutates
    def decode_async(self, ids: np.ndarray, positions: np.ndarray) -> Step:
        """:meth:`decode` of slots ``0..top``, committed, launched: its :class:`Step`'s ``result()`` returns
        what ``decode(ids, positions)`` returns. The cache's bookkeeping (lengths, mask) is the step's
        once this returns; until the result is taken every call that changes the cache raises
        ``RuntimeError``; a result that raises leaves the cache as it was before the step. Here (host
        arrays, ONNX Runtime) the step is computed before this returns (a call that raises stores nothing); a
        device cache (``asynchronous``) returns once the work is queued, so the host can work meanwhile."""
        logits = self.decode(ids, positions)
        return Step(self, lambda: logits)

    def _embed_decode(self, ids: np.ndarray) -> np.ndarray:
        """A decode step's ``inputs_embeds`` (rows, 1, hidden): ``ids`` through ``embed``."""
        return self.backend.run("embed", {"input_ids": ids}, "decode")["inputs_embeds"]

    def _run_prefill(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray,
                     past: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        feed = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions}
        feed.update({f"past_{name}": v for name, v in past.items()})
        return self.backend.run("decoder", feed, "prefill")

    def _run_decode(self, embeds: np.ndarray, positions: np.ndarray,
                    rows: slice) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
        """The decoder on ``rows`` of the slots: (logits, each cache's new column (rows, heads, dim))."""
        feed = {"inputs_embeds": embeds, "attention_mask": self.mask[rows], "position_ids": positions}
        feed.update({f"past_{name}": self.store[name][rows] for name in self.spec.names})
        out = self.backend.run("decoder", feed, "decode")
        return out["logits"], {name: out[f"present_{name}"][:, :, -1] for name in self.spec.names}


class OrtKVCache(KVCache):
    """The host cache bound to ONNX Runtime's decoder with IOBinding: a decode step reads the slots where
    they are and writes each ``present_*`` into a preallocated array, so nothing is allocated per step and
    only the new columns are copied (into the slots) afterwards. A staged decoder binds each stage to its
    own layers' slots; the ``hidden_states`` between stages stay in one array that one stage writes and the
    next reads.

    A decode step's bindings are made once per layout (the rows it runs, the capacity) and kept: the step's
    embeddings, positions and logits live in arrays bound for good, so a step in a steady batch is a copy of
    its inputs and one ``run_with_iobinding`` per stage (~10 bindings through the Python API cost ~60 us a
    step at the tiny config, a tenth of the graph's own time). That needs every stage's first output to have
    static sizes past its batch (and sequence) axis, and the stages to hand over one dtype; a graph without
    them is bound again at each step, its outputs allocated by ONNX Runtime (``steady`` False). Where the
    ``embed`` graph is a table lookup (:func:`~autoglm_build.onnx_io.gather_table`) a decode step's embeddings
    are gathered from the table instead of a session call."""

    def __init__(self, backend: Any, spec: CacheSpec, slots: int, context: int, dtype: Any = np.float32) -> None:
        # per stage: session, its binding, its first input's dtype, its own cache names, its mask/position inputs
        self.stages = []
        for unit in backend.parts.get("decoder", ["decoder"]):
            session, inputs = backend.sessions[unit], backend.inputs[unit]
            own = [n[len("past_"):] for n in inputs if n.startswith("past_")]
            steps = [n for n in ("attention_mask", "position_ids") if n in inputs]  # not the head stage's
            self.stages.append((session, session.io_binding(), inputs[0], backend.dtypes[unit][inputs[0]], own, steps))
        self.outputs = self._step_outputs()  # per stage: (name, shape past the batch axis, dtype), or None
        self.present: Dict[str, np.ndarray] = {}
        self.bound: Optional[Tuple[int, int]] = None  # the rows the decode bindings hold; None: bind again
        self.io: Dict[str, np.ndarray] = {}  # the arrays a decode step's bindings point at
        self.new: Dict[str, np.ndarray] = {}  # views of the bound presents' last column: a step's new keys/values
        self.table = backend.lookup("embed")  # (table, dtype) of a lookup ``embed`` graph, else None
        super().__init__(backend, spec, slots, context, dtype)

    @property
    def steady(self) -> bool:
        """Whether decode steps keep their bindings (see the class docstring)."""
        return self.outputs is not None

    def _step_outputs(self) -> Optional[List[Tuple[str, Tuple[int, ...], Any]]]:
        """Each stage's first output as a decode step writes it (a batch of rows, one new token): its name, its
        shape past the batch axis (a 3-D output's sequence axis is 1; every other size must be static), its dtype;
        None where some stage's is not known that way, or a stage hands over a dtype the next does not take."""
        outs = []
        for k, (session, *_) in enumerate(self.stages):
            output = session.get_outputs()[0]  # logits (batch, vocab), or hidden_states (batch, seq, hidden)
            dims = list(output.shape[1:])
            if len(dims) == 2 and not isinstance(dims[0], int):
                dims[0] = 1  # the sequence axis: one new token
            dtype = ort_float(output.type)
            if dtype is None or not all(isinstance(d, int) and d > 0 for d in dims):
                return None
            if k + 1 < len(self.stages) and dtype != self.stages[k + 1][3]:
                return None
            outs.append((output.name, tuple(dims), dtype))
        return outs

    def _allocate(self, capacity: int) -> None:
        self.bound = None  # first: whatever fails below, no step runs on bindings to arrays that are gone
        present = {name: self._empty(self.slots, capacity + 1) for name in self.spec.names}
        super()._allocate(capacity)
        self.present = present

    @staticmethod
    def _bind_input(binding: Any, name: str, array: np.ndarray) -> None:
        binding.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)

    @staticmethod
    def _bind_output(binding: Any, name: str, array: np.ndarray) -> None:
        binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)

    def _embed_decode(self, ids: np.ndarray) -> np.ndarray:
        if self.table is None:
            return super()._embed_decode(ids)
        table, dtype = self.table
        return table[ids].astype(dtype, copy=False)

    def _bind_decode(self, rows: slice, embeds: np.ndarray) -> None:
        """Bind every stage for decode steps of ``rows``: the slots and presents of its layers, the mask, and the
        step's own arrays (``io``: the first stage's input, each stage's first output, the positions)."""
        self.bound = None  # until every stage is bound
        n = rows.stop - rows.start
        self.io = {"position_ids": np.zeros((n, 3, 1), np.int64),
                   "in.0": np.zeros((n,) + embeds.shape[1:], self.stages[0][3])}
        for k, ((_, binding, first, _, own, steps), (output, shape, dtype)) in \
                enumerate(zip(self.stages, self.outputs)):
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
            self._bind_input(binding, first, self.io[f"in.{k}"])
            if "attention_mask" in steps:
                self._bind_input(binding, "attention_mask", self.mask[rows])
            if "position_ids" in steps:
                self._bind_input(binding, "position_ids", self.io["position_ids"])
            for name in own:
                self._bind_input(binding, f"past_{name}", self.store[name][rows])
                self._bind_output(binding, f"present_{name}", self.present[name][rows])
            self.io[f"out.{k}"] = self.io[f"in.{k + 1}"] = np.zeros((n,) + shape, dtype)  # the next stage's input
            self._bind_output(binding, output, self.io[f"out.{k}"])
        self.io["logits"] = self.io[f"out.{len(self.stages) - 1}"]
        self.new = {name: self.present[name][rows, :, -1] for name in self.spec.names}  # views: each step's columns
        self.bound = (rows.start, rows.stop)

    def _run_decode(self, embeds: np.ndarray, positions: np.ndarray,
                    rows: slice) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
        if not self.steady:
            return self._run_decode_unbound(embeds, positions, rows)
        if embeds.shape[0] != rows.stop - rows.start:
            raise ValueError(f"decode: {embeds.shape[0]} rows of embeddings for {rows.stop - rows.start} rows")
        if self.bound != (rows.start, rows.stop):
            self._bind_decode(rows, embeds)
        io = self.io
        io["in.0"][...] = embeds
        io["position_ids"][...] = positions
        for session, binding, *_ in self.stages:
            session.run_with_iobinding(binding)
        # the logits array is the next step's too (as the device cache's is): the scheduler samples before that
        return io["logits"], self.new

    def _run_decode_unbound(self, embeds: np.ndarray, positions: np.ndarray,
                            rows: slice) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
        """A decode step bound afresh, each output allocated by ONNX Runtime (a graph that is not ``steady``)."""
        hidden = embeds
        for session, binding, first, first_dtype, own, steps in self.stages:
            keep = {first: np.ascontiguousarray(hidden, first_dtype), "attention_mask": self.mask[rows],
                    "position_ids": np.ascontiguousarray(positions, np.int64)}  # alive until the run returns
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
            binding.bind_output(session.get_outputs()[0].name, "cpu")  # logits, or hidden_states
            for name in (first, *steps):
                self._bind_input(binding, name, keep[name])
            for name in own:
                self._bind_input(binding, f"past_{name}", self.store[name][rows])
                self._bind_output(binding, f"present_{name}", self.present[name][rows])
            session.run_with_iobinding(binding)
            hidden = binding.get_outputs()[0].numpy()
        self.bound = None  # the bindings now hold this step's arrays
        return hidden, {name: self.present[name][rows, :, -1] for name in self.spec.names}
