"""The start-up prefetch: this model's most recently used entries on disk read into the hot
tier a slice at a time, so that the first requests after a restart are served from RAM."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .blocks import root_key
from .index import BlockRecord, Index, IndexDamaged
from .live import SLOTS as LIVE_SLOTS
from .ram import HotBlock, RamTier

PREFETCH_SCAN = 200_000  # index entries looked at for the plan (other models' are skipped)
PREFETCH_SLICE_BYTES = 32 * 2**20  # read per slice: what a request arriving meanwhile may wait for

# Reads a slice of planned entries, checked: the hot blocks of those that passed.
ReadSlice = Callable[[list[tuple[bytes, BlockRecord]]], list[HotBlock]]


@dataclass
class Prefetch:
    """The start-up read of this model's most recently used entries into the hot tier, so
    that the first requests after a restart are served from RAM (TieredStore.prefetch_step)."""

    planned: deque[tuple[bytes, BlockRecord]]
    epoch: int  # the hot tier's purge epoch it began in: a purge since ends it
    entries: int = 0
    nbytes: int = 0
    began: float = field(default_factory=time.perf_counter)
    seconds: float | None = None  # how long it took, once it ended
    stopped: str | None = None  # why it ended early: "purged", "memory pressure", "full", "queue full"
    leaves: list[bytes] = field(default_factory=list)  # the newest conversations' last blocks, newest first
    live_tokens: int | None = None  # what the live caches rebuilt from their chains hold, once tried
    tokenized_texts: int | None = None  # the newest conversations' texts tokenized ahead, once done

    @property
    def done(self) -> bool:
        return self.seconds is not None

    def end(self, why: str | None = None) -> None:
        self.stopped = self.stopped or why
        if self.seconds is None:
            self.seconds = time.perf_counter() - self.began

    def step(self, read: ReadSlice, ram: RamTier, room: Callable[[], int], epoch: Callable[[], int],
             entries: int, max_bytes: int) -> bool:
        """Read the next planned entries (up to `entries` and `max_bytes`; at least one) with
        `read`, into the hot tier without evicting anything (`room`: its free bytes); False
        once the prefetch has ended. A purge meanwhile (`epoch` moved on) drops what was read."""
        if self.done:
            return False
        blocks = read(self._next_slice(entries, max_bytes))
        for block in blocks:
            if block.nbytes > room():
                self.end("full")
                break
            ram.put_behind(block)  # read newest first: each is older than those before
            self.entries += 1
            self.nbytes += block.nbytes
        if epoch() != self.epoch:  # a purge ran meanwhile: what was read is gone too
            for block in blocks:
                ram.remove(block.key)
            self.end("purged")
        if not self.planned:
            self.end()
        return not self.done

    def _next_slice(self, entries: int, max_bytes: int) -> list[tuple[bytes, BlockRecord]]:
        batch: list[tuple[bytes, BlockRecord]] = []
        while self.planned and len(batch) < entries and \
                (not batch or sum(r.nbytes for _, r in batch) + self.planned[0][1].nbytes <= max_bytes):
            batch.append(self.planned.popleft())
        return batch

    def hot_chains(self, ram: RamTier, fingerprint: str) -> list[list[int]]:
        """The tokens of the newest conversations whose blocks are all hot, oldest first (the
        live caches drop their oldest entry when full)."""
        chains = (chain_tokens(ram, fingerprint, leaf) for leaf in reversed(self.leaves))
        return [tokens for tokens in chains if tokens]

    def stats(self) -> dict:
        # Done for its users once the texts are tokenized too (never started if it stopped early).
        finished = self.done and (self.stopped is not None or self.tokenized_texts is not None)
        return {"done": finished, "entries": self.entries, "bytes": self.nbytes, "planned": len(self.planned),
                "seconds": round(self.seconds, 3) if self.seconds is not None else None, "stopped": self.stopped,
                "live_tokens": self.live_tokens, "tokenized_texts": self.tokenized_texts}


def plan_prefetch(index: Index | None, fingerprint: str, ram: RamTier, room: int, epoch: int) -> Prefetch:
    """This model's most recently used entries in `index` (None: nothing to read), newest first
    (a conversation's blocks and snapshots together), up to `room` bytes, those not hot."""
    planned: deque[tuple[bytes, BlockRecord]] = deque()
    if index is not None and room > 0:
        try:
            total = 0
            for scanned, (key, record) in enumerate(index.newest()):
                if scanned >= PREFETCH_SCAN or total + record.nbytes > room:
                    break
                if record.fingerprint == fingerprint and key not in ram:
                    planned.append((key, record))
                    total += record.nbytes
        except IndexDamaged:  # being rebuilt: nothing to plan from
            planned.clear()
    return Prefetch(planned, epoch, leaves=_newest_leaves(planned, LIVE_SLOTS))


def chain_tokens(ram: RamTier, fingerprint: str, key: bytes) -> list[int] | None:
    """The tokens of the chain ending at block `key`, read from its hot blocks back to the
    root; None unless every one of them is hot."""
    root, parts = root_key(fingerprint), []
    while key != root:
        block = ram.get(key)
        if block is None or block.kind != "kv":
            return None
        parts.append(block.tokens)
        key = block.parent
    return np.concatenate(parts[::-1]).tolist() if parts else None


def _newest_leaves(planned: deque[tuple[bytes, BlockRecord]], limit: int) -> list[bytes]:
    """The ends of the conversations used last, newest first: of the chain ends (KV blocks no
    other one continues) used together (one access time: what a request wrote or reused),
    the deepest one. Conversations on other prefixes come before more of one prefix: a live
    cache serves any prompt sharing half of it, so four turns of one agent's conversation
    would leave its subagents (other system prompts) to copy from the hot blocks."""
    records = {key: record for key, record in planned if record.kind == "kv"}
    continued = {bytes.fromhex(record.parent) for record in records.values()}
    used_together: dict[int, list[tuple[bytes, BlockRecord]]] = {}
    for key, record in records.items():  # newest first, as planned
        if key not in continued:
            used_together.setdefault(record.access_ms, []).append((key, record))
    ends = [max(group, key=lambda kr: kr[1].depth)[0] for group in used_together.values()]
    chosen: list[bytes] = []
    held: set[bytes] = set()  # the blocks of the chosen conversations' chains
    for end in ends:
        chain = _chain(end, records)
        # Its block halfway up: another conversation holding it shares at least half of this one.
        if len(chosen) < limit and (chain[len(chain) // 2] if chain else end) not in held:
            chosen.append(end)
            held.update(chain)
    return chosen + [end for end in ends if end not in chosen][: limit - len(chosen)]


def _chain(key: bytes, records: dict[bytes, BlockRecord]) -> list[bytes]:
    """`key` and its ancestors among `records`, leaf first."""
    chain = []
    while key in records:
        chain.append(key)
        key = bytes.fromhex(records[key].parent)
    return chain
