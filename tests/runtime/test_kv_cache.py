"""autoglm_build/runtime/kv_cache.py: ONNX Runtime's bound cache computes what the plain host cache computes."""

from __future__ import annotations

import numpy as np
import pytest

from autoglm_build.runtime.kv_cache import CacheSpec, Chunk, KVCache, OrtKVCache


def _prefill(cache, slot: int, ids: np.ndarray) -> np.ndarray:
    n = ids.shape[1]
    return cache.prefill([slot], [n], [Chunk(ids, np.ones((1, n), np.int64),
                                             np.broadcast_to(np.arange(n), (1, 3, n)).copy())])


@pytest.mark.parametrize("steady", [True, False])
def test_the_bound_decode_steps_equal_the_plain_caches_through_rows_joining_leaving_and_growing(runtime, monkeypatch,
                                                                                                 steady):
    """Decode steps through IOBinding kept across steps (and the embed table's lookup) give the logits and the stored
    keys/values of :class:`KVCache` (every call through ``backend.run``), while the capacity grows page by page, rows
    leave (fewer rows run), a row joins, and one row runs alone without committing; and a steady batch binds once
    per capacity, not once per step. Not ``steady`` (a graph whose outputs' sizes are not all static): bound afresh
    at each step, the same numbers."""
    cfg, backend, _ = runtime
    t = cfg.text
    spec = CacheSpec(t.num_hidden_layers, t.num_key_value_heads, t.head_dim)
    plain = KVCache(backend, spec, 4, 256, backend.input_dtype("decoder", "past_key.0"))
    bound = backend.kv_cache(spec, 4, 256)
    assert isinstance(bound, OrtKVCache) and bound.table is not None  # the tiny embed graph is a lookup
    assert bound.steady  # the tiny decoder's logits are (batch, 4096)
    if not steady:
        bound.outputs = None
    binds = []
    real = bound._bind_decode
    monkeypatch.setattr(bound, "_bind_decode", lambda rows, embeds: (binds.append(rows), real(rows, embeds)))
    rng = np.random.default_rng(5)
    lengths = {0: 9, 1: 14, 2: 5}
    for slot, n in lengths.items():
        ids = rng.integers(0, t.vocab_size, (1, n))
        np.testing.assert_array_equal(_prefill(bound, slot, ids), _prefill(plain, slot, ids))
    position = dict(lengths)
    for step in range(48):
        if step == 12:
            for cache in (plain, bound):
                cache.release(1)
        if step == 20:
            for cache in (plain, bound):
                cache.release(2)  # slot 0 alone: one row runs
        if step == 26:
            ids = rng.integers(0, t.vocab_size, (1, 7))
            np.testing.assert_array_equal(_prefill(bound, 3, ids), _prefill(plain, 3, ids))
            position[3] = 7
        top = plain.top
        assert bound.top == top
        ids = rng.integers(0, t.vocab_size, (top, 1))
        positions = np.zeros((top, 3, 1), np.int64)
        for slot in range(top):
            positions[slot] = position.get(slot, 0)
        if step == 30:  # the scheduler's isolation path: one row alone, nothing stored
            alone = bound.decode(ids[:1], positions[:1], slot=0, commit=False)
            np.testing.assert_array_equal(alone, plain.decode(ids[:1], positions[:1], slot=0, commit=False))
        if step == 40:
            steady_binds = len(binds)
        np.testing.assert_array_equal(bound.decode(ids, positions), plain.decode(ids, positions),
                                      err_msg=f"step {step}")
        for slot in position:
            position[slot] += 1
    for name in spec.names:
        used = np.flatnonzero(plain.used)
        for slot in used:
            n = plain.lengths[slot]
            np.testing.assert_array_equal(bound.store[name][slot, :, :n], plain.store[name][slot, :, :n])
    assert bound.capacity > 32  # it grew past two pages on the way
    if steady:
        assert len(binds) - steady_binds <= 1, binds  # steps 40-47: one capacity at most, so one binding at most
    else:
        assert not binds and bound.bound is None


def test_a_re_layout_that_fails_leaves_no_step_on_the_old_arrays(runtime, monkeypatch):
    """The re-layout's allocation raising (memory) mid-way: the step fails, and the steps after it, once the memory
    is there, equal the plain cache's (nothing runs on bindings to arrays the failed re-layout dropped)."""
    cfg, backend, _ = runtime
    t = cfg.text
    spec = CacheSpec(t.num_hidden_layers, t.num_key_value_heads, t.head_dim)
    plain = KVCache(backend, spec, 2, 256, backend.input_dtype("decoder", "past_key.0"))
    bound = backend.kv_cache(spec, 2, 256)
    rng = np.random.default_rng(9)
    ids = rng.integers(0, t.vocab_size, (1, 14))
    for slot in (0, 1):
        np.testing.assert_array_equal(_prefill(bound, slot, ids), _prefill(plain, slot, ids))
    real = bound._empty
    failed = []

    def empty(slots, columns):
        if columns > 16 and columns % 2 and not failed:  # the new presents (capacity + 1 columns), past one page
            failed.append(columns)
            raise MemoryError("no room for the new layout")
        return real(slots, columns)

    monkeypatch.setattr(bound, "_empty", empty)
    for step in range(6):
        step_ids = rng.integers(0, t.vocab_size, (2, 1))
        positions = np.full((2, 3, 1), 14 + step, np.int64)
        if not failed:
            try:
                bound.decode(step_ids, positions)
            except MemoryError:
                pass
            else:
                plain.decode(step_ids, positions)
                continue
        np.testing.assert_array_equal(bound.decode(step_ids, positions), plain.decode(step_ids, positions))
    assert failed
