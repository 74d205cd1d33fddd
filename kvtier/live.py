"""Live caches: the prompt caches of the last finished requests, kept whole in memory, so
that a next turn sharing their prefix takes one over (trimmed back to the common prefix)
instead of copying its blocks out of the hot tier into new buffers.

An entry belongs to one request at a time: `take` removes it, the request's `finish` offers
its cache back. Only sliced layers (KVCache, QuantizedKVCache) can be trimmed: for a model
with snapshot layers an entry is taken only by a prompt that extends the whole sequence it
holds. The store counts the entries' bytes against the hot tier's budget and drops them
first, under memory pressure and on a purge.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from . import kvstate
from .blocks import common_prefix
from .kvstate import CachePlan

SLOTS = 4  # entries kept at most: a few agents' conversations taking turns


@dataclass(eq=False)
class LiveEntry:
    tokens: np.ndarray  # uint32: exactly the tokens the cache holds
    prompt_cache: list[Any]
    nbytes: int  # what its arrays occupy (buffers grow in steps: more than the tokens')
    epoch: int  # the `LiveCaches.epoch` its request began in
    prefetched: bool = False  # rebuilt at start-up from blocks the prefetch read from disk


@dataclass
class LiveHit:
    entry: LiveEntry
    reuse: int  # prompt tokens it gives: never the prompt's last


class LiveCaches:
    def __init__(self, plan: CachePlan, slots: int = SLOTS):
        self.plan, self.slots = plan, slots
        self.epoch = 0  # moved on by `clear`: a cache a request took before it is not kept
        self._entries: list[LiveEntry] = []  # oldest first
        self._lock = threading.Lock()  # `clear` runs on the event loop's threads too

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._held_bytes()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def sequences(self) -> list[list[int]]:
        """The tokens each entry holds, oldest first (for stats and tests)."""
        with self._lock:
            return [e.tokens.tolist() for e in self._entries]

    def best(self, tokens: Sequence[int]) -> LiveHit | None:
        """The entry that gives the most of `tokens`' prefix, all but the last token at most,
        and at least half of what it holds."""
        prompt = np.asarray(tokens, np.uint32)
        best = None
        with self._lock:
            entries = list(self._entries)
        for entry in entries:
            reuse = min(common_prefix(entry.tokens, prompt), len(prompt) - 1)
            if self.plan.needs_snapshots and reuse != len(entry.tokens):
                continue  # recurrent state cannot be wound back
            if 2 * reuse < len(entry.tokens):
                continue  # a short share is copied from the blocks: the entry stays for its own next turn
            if reuse > 0 and (best is None or reuse > best.reuse):
                best = LiveHit(entry, reuse)
        return best

    def take(self, hit: LiveHit) -> list[Any] | None:
        """The hit's cache, its own from now on, holding `hit.reuse` tokens (None: dropped
        meanwhile)."""
        with self._lock:
            if hit.entry not in self._entries:
                return None
            self._entries.remove(hit.entry)
        kvstate.trim_to(hit.entry.prompt_cache, self.plan, hit.reuse)
        return hit.entry.prompt_cache

    def offer(self, prompt_cache: list[Any], sequence: Sequence[int], epoch: int, room: int,
              prefetched: bool = False) -> bool:
        """Keep a finished request's cache, holding `sequence` (or its leading part), if it
        fits in `room` bytes; the oldest entries go to make room. False if not kept."""
        held = self._held_tokens(prompt_cache, len(sequence))
        if held is None:
            return False
        entry = LiveEntry(np.asarray(sequence[:held], np.uint32), prompt_cache,
                          kvstate.cache_nbytes(prompt_cache), epoch, prefetched)
        if entry.nbytes > room:
            return False
        with self._lock:
            if epoch != self.epoch:  # a purge came between (checked under the lock `clear` takes)
                return False
            self._entries.append(entry)
            while len(self._entries) > self.slots or self._held_bytes() > room:
                self._entries.pop(0)
        return True

    def shrink_to(self, target_bytes: int) -> int:
        """Drop the oldest entries until they hold at most `target_bytes`; the bytes released."""
        released = 0
        with self._lock:
            while self._entries and self._held_bytes() > target_bytes:
                released += self._entries.pop(0).nbytes
        return released

    def clear(self) -> int:
        """Drop every entry, and refuse the caches requests already took (a purge)."""
        with self._lock:
            self.epoch += 1
        return self.shrink_to(0)

    def _held_bytes(self) -> int:
        """What the entries occupy (the caller holds the lock)."""
        return sum(e.nbytes for e in self._entries)

    def _held_tokens(self, prompt_cache: list[Any], sequence_length: int) -> int | None:
        """Tokens of the sequence the cache holds, when it holds them consistently: every sliced
        layer at one offset within the sequence (the whole of it with snapshot layers, whose
        state has seen every token fed)."""
        offsets = {prompt_cache[i].offset for i in self.plan.sliced}
        held = offsets.pop() if offsets else sequence_length
        if offsets or not 0 < held <= sequence_length:
            return None
        if self.plan.needs_snapshots and held != sequence_length:
            return None
        return held
