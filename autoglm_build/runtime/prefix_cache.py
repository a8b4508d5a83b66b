"""Prefix reuse: the keys/values of prompt prefixes kept across requests, in blocks keyed by a hash chain.

The phone agent sends, every step, the system prompt and the history before the newest screenshot;
that prefix is the same token for token across the steps of a session (and the system prompt across
sessions). A prompt is cut into blocks of ``block_tokens`` tokens; block ``i``'s key hashes block
``i - 1``'s key with its own token ids, its GLM 3-D rotary positions and, for each image or audio
clip with tokens in it, where the clip starts and its identity (``Prompt.media_keys``: a digest of
the bytes the client sent; a prompt built without one falls back to a digest of the embeddings). So
a key names everything its keys/values were computed from: the whole prefix up to the block's end,
what each placeholder was filled with, and the positions the full prefill would give it (keys are
stored after their rotary embedding, so a block at other positions must never match). Two different
screenshots at the same token positions have different keys.

A request takes the longest run of leading blocks that are held (at most its prompt less one token:
the last token runs through the decoder for the logits), prefills only the rest, and afterwards its
prompt's full blocks that were not held are copied out of its slot. Blocks live under a byte budget,
least recently used first out; a request touches its blocks from the deepest to the first, so a
block is always used more recently than the blocks after it and eviction takes chains from their
ends (an evicted block orphans nothing that stays). Blocks a planned prefill still reads are pinned.

The memory is the :class:`~autoglm_build.runtime.kv_cache.KVCache`'s (``save_block``, ``free_block``,
``prefill(prefixes=...)``): host arrays today, a device cache's own buffers later; this module holds
only the index, the policy and the counters.
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence

import numpy as np

from autoglm_build.runtime.kv_cache import KVCache, Prefix
from autoglm_build.runtime.text import Prompt

BLOCK_TOKENS = 256


@dataclass
class _Entry:
    block: Any  # the KV cache's handle
    bytes: int
    pins: int = 0


@dataclass
class Reuse:
    """One request's plan: its full blocks' keys, the held blocks it starts with (pinned until
    :meth:`PrefixCache.release`), and how many prompt tokens they give it."""

    keys: List[bytes]
    entries: List[_Entry] = field(default_factory=list)
    tokens: int = 0

    @property
    def prefix(self) -> Prefix:
        return Prefix([e.block for e in self.entries], self.tokens)


def block_keys(prompt: Prompt, block_tokens: int) -> List[bytes]:
    """The hash chain of ``prompt``'s full blocks (see the module docstring)."""
    ids = np.asarray(prompt.ids, np.int64)
    positions = np.asarray(prompt.positions, np.int64)
    media = []
    for (at, embeds), key in zip(prompt.splices, prompt.media_keys or [None] * len(prompt.splices)):
        if key is None:
            key = hashlib.blake2b(np.ascontiguousarray(embeds).tobytes(), digest_size=32).digest()
        media.append((at, len(embeds), key))
    keys, parent = [], b""
    for start in range(0, len(ids) - block_tokens + 1, block_tokens):
        stop = start + block_tokens
        h = hashlib.blake2b(parent, digest_size=32)
        h.update(ids[start:stop].tobytes())
        h.update(np.ascontiguousarray(positions[:, start:stop]).tobytes())
        for at, count, key in media:
            if at < stop and at + count > start:
                h.update(int(at).to_bytes(8, "little") + key)
        parent = h.digest()
        keys.append(parent)
    return keys


class PrefixCache:
    """Blocks of prompt keys/values by hash chain, within ``budget`` bytes (LRU).

    Args:
        cache: the KV cache whose memory holds the blocks.
        budget: bytes of blocks held at most (0: reuse off).
        block_tokens: tokens per block.
    """

    def __init__(self, cache: KVCache, budget: int, block_tokens: int = BLOCK_TOKENS) -> None:
        self.cache, self.budget, self.block_tokens = cache, budget, block_tokens
        self.entries: collections.OrderedDict[bytes, _Entry] = collections.OrderedDict()  # LRU first
        self.bytes = 0
        self.counters = {"hits": 0, "misses": 0, "tokens_queried": 0, "tokens_reused": 0, "blocks_stored": 0,
                         "evictions": 0}

    @property
    def enabled(self) -> bool:
        return self.budget >= self.cache.block_bytes(self.block_tokens)

    def lookup(self, prompt: Prompt) -> Reuse:
        """The held blocks ``prompt`` starts with, pinned; counted as a hit or a miss."""
        if not self.enabled:
            return Reuse([])
        plan = Reuse(block_keys(prompt, self.block_tokens))
        for key in plan.keys:
            entry = self.entries.get(key)
            if entry is None:
                break
            plan.entries.append(entry)
        plan.tokens = min(len(plan.entries) * self.block_tokens, len(prompt.ids) - 1)
        for entry in plan.entries:
            entry.pins += 1
        self._touch(plan.keys[:len(plan.entries)])
        self.counters["hits" if plan.tokens else "misses"] += 1
        self.counters["tokens_queried"] += len(prompt.ids)
        self.counters["tokens_reused"] += plan.tokens
        return plan

    def release(self, plan: Reuse) -> None:
        """The prefill that read ``plan``'s blocks is over: they may be evicted again."""
        for entry in plan.entries:
            entry.pins -= 1
        plan.entries = []

    def store(self, plan: Reuse, slot: int) -> int:
        """Copy the prompt's full blocks that are not held out of ``slot`` (its row, just prefilled),
        evicting unpinned least recently used blocks for room; stops at the first block that does not
        fit (the blocks after it could never be reached). Returns the blocks stored."""
        stored, size = 0, self.cache.block_bytes(self.block_tokens)
        for i, key in enumerate(plan.keys):
            if key in self.entries:
                continue
            if not self._make_room(size, set(plan.keys[:i])):
                break
            start = i * self.block_tokens
            self.entries[key] = _Entry(self.cache.save_block(slot, start, start + self.block_tokens), size)
            self.bytes += size
            stored += 1
        self.counters["blocks_stored"] += stored
        self._touch([k for k in plan.keys if k in self.entries])
        return stored

    def _touch(self, keys: Sequence[bytes]) -> None:
        """Most recently used: the first block last, so a chain is evicted from its end."""
        for key in reversed(keys):
            if key in self.entries:
                self.entries.move_to_end(key)

    def _make_room(self, size: int, keep: set) -> bool:
        """Evict least recently used unpinned blocks (never those in ``keep``) until ``size`` fits."""
        while self.bytes + size > self.budget:
            victim = next((k for k, e in self.entries.items() if not e.pins and k not in keep), None)
            if victim is None:
                return False
            entry = self.entries.pop(victim)
            self.cache.free_block(entry.block)
            self.bytes -= entry.bytes
            self.counters["evictions"] += 1
        return True

    def stats(self) -> Dict[str, int]:
        """The counters, what is held and the bounds."""
        return {**self.counters, "blocks": len(self.entries), "bytes": self.bytes, "budget_bytes": self.budget,
                "block_tokens": self.block_tokens}

    def summary(self) -> str:
        """One log line of the counters."""
        c = self.counters
        share = c["tokens_reused"] / c["tokens_queried"] if c["tokens_queried"] else 0.0
        return (f"prefix cache: {c['hits']} hits, {c['misses']} misses, {c['tokens_reused']} of "
                f"{c['tokens_queried']} prompt tokens reused ({share:.0%}), {len(self.entries)} blocks "
                f"({self.bytes / 2**20:.1f} of {self.budget / 2**20:.0f} MiB), {c['evictions']} evictions")
