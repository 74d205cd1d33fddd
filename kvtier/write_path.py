"""Keeping blocks: new ones hot in RAM and queued for the tiers below it, blocks read from a
tier made hot, the writer thread's job (each tier in turn, nearest first), and what RAM lets
go of. A block is findable from the moment it is computed: RAM holds it until a durable tier
has it (`RamTier.hold` .. `written`)."""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np

from .blocks import common_prefix
from .disk import encode_block
from .kvstate import nbytes
from .live import LiveCaches
from .ram import HotBlock, RamTier
from .restored import NewEntry
from .tier import Count, Tier
from .writer import DiskWriter, Entry, WriteJob

log = logging.getLogger("kvtier.tiers")

Children = Callable[..., dict[bytes, np.ndarray]]


class WritePath:
    """Writes of one model's (`fingerprint`) entries from `ram` to `tiers`, through a writer
    thread with a `queue_bytes` bound; `children` lists a parent's entries in RAM and the local
    tiers (to drop partial blocks a new one covers); the `live` caches give way in RAM first."""

    def __init__(self, ram: RamTier, tiers: list[Tier], fingerprint: str, queue_bytes: int,
                 live: LiveCaches | None, children: Children, count: Count):
        self.ram, self.tiers, self.fingerprint, self.live = ram, tiers, fingerprint, live
        self._children, self.count = children, count
        self.writer = DiskWriter(self._write_then_release, queue_bytes)

    @property
    def durable(self) -> bool:
        """Whether some tier keeps what RAM lets go of (then writes go through the writer)."""
        return any(t.durable for t in self.tiers)

    def store(self, entries: list[NewEntry]) -> None:
        """Keep a request's new blocks and snapshots hot; queue them for the tiers together.
        They are queued first, so RAM holds them (findable) until a durable tier has them.

        A KV block may be partial (the tail of a request). Any partial sibling whose tokens a
        new block starts with is now redundant (the tail match finds them here): dropped.
        """
        blocks, removed = [], []
        for entry in entries:
            if entry.ref.key in self.ram:
                continue
            block = HotBlock(entry.ref.key, entry.ref.parent, entry.ref.index,
                             np.asarray(entry.tokens, np.uint32), entry.arrays, nbytes(entry.arrays),
                             kind=entry.kind, skeleton=entry.skeleton)
            if block.kind == "kv":
                removed += self._covered_partials(block)
            blocks.append(block)
        for key in removed:
            self.ram.remove(key)
        self.retry_writes()
        self.submit(blocks, removed)
        self.put_hot(blocks)

    def touch(self, keys: list[bytes]) -> None:
        """Entries a request reused: the most recently used now, in RAM and the tiers."""
        if keys:
            self.ram.touch_chain(keys)
            self.note(lambda: self._each_tier(lambda tier: tier.touch(keys)))

    def add_counters(self, counters: dict[str, int]) -> None:
        """A request's counts, into the tiers that keep them (the index: rates across restarts)."""
        self.note(lambda: self._each_tier(lambda tier: tier.add_counters(counters)))

    def note(self, bookkeeping: Callable[[], None]) -> None:
        """Best-effort bookkeeping in the tiers below RAM runs on the writer thread, after the
        writes queued before it: an index commit (an fsync, ~5 ms) is no step of a request."""
        if self.durable:
            self.writer.submit(WriteJob([], note=bookkeeping))
        else:
            bookkeeping()

    def _each_tier(self, do: Callable[[Tier], None]) -> None:
        for tier in self.tiers:
            do(tier)

    def retry_writes(self) -> None:
        """Once a tier takes writes again, queue what RAM holds unwritten (on the MLX thread:
        encoding reads MLX arrays; the daemon calls it when no request comes)."""
        if any([t.take_retry() for t in self.tiers]):  # each tier's flag taken
            self.submit(self.ram.unpersisted())

    def promote(self, entries: list[NewEntry]) -> None:
        """Blocks a request read from a tier below RAM, cut back out of the cache they were
        restored into: hot from now on. Those from a durable tier are not written again (its
        files hold the same bits); the others are kept durably too, and not written back to
        the tier they came from."""
        durable = {t.name for t in self.tiers if t.durable}
        self.keep_hot([HotBlock(e.ref.key, e.ref.parent, e.ref.index, np.asarray(e.tokens, np.uint32), e.arrays,
                                nbytes(e.arrays), persisted=e.source in durable, origin=e.source)
                       for e in entries if e.ref.key not in self.ram])

    def keep_hot(self, blocks: list[HotBlock]) -> None:
        """Blocks read from a tier, hot from now on; those no durable tier holds queued for one."""
        self.submit([b for b in blocks if not b.persisted])
        self.put_hot(blocks)

    def put_hot(self, blocks: list[HotBlock]) -> None:
        """Into the hot tier. The live caches count against its budget and make room first:
        dropped (oldest first) before any block is evicted for these."""
        if self.live is not None:
            room = self.ram.budget - self.ram.num_bytes - sum(b.nbytes for b in blocks)
            if self.live.shrink_to(max(room, 0)):
                self.count("live_dropped")
        for block in blocks:
            self.evicted(self.ram.put(block))

    def _covered_partials(self, block: HotBlock) -> list[bytes]:
        first = int(block.tokens[0]) if len(block.tokens) else None
        return [key for key, tokens in self._children(block.parent, first=first).items()
                if key != block.key and len(tokens) < len(block.tokens)
                and common_prefix(tokens, block.tokens) == len(tokens)]

    def submit(self, blocks: list[HotBlock], removed: Sequence[bytes] = ()) -> None:
        """Queue blocks for the tiers; RAM holds them until a durable tier has them, so a block
        is findable from the moment it is computed (the overshoot is bounded by the queue).
        With no durable tier there is nothing to wait for: the others take them now."""
        if not self.durable:
            self._put_down([Entry(b.key, self._encode(b), b) for b in blocks])
            return
        entries = [Entry(key, None) for key in removed]  # ordered after their pending writes
        entries += [Entry(block.key, self._encode(block), block) for block in blocks]
        if entries:
            self.ram.hold(blocks)
            self.writer.submit(WriteJob(entries))

    def _encode(self, block: HotBlock) -> bytes:
        return encode_hot(block, self.fingerprint)

    def _write_then_release(self, job: WriteJob) -> None:
        """Runs on the writer thread: write the job, then let RAM evict its blocks again
        (after the durable tier's commit, so a lookup finds each one in RAM or there throughout)."""
        try:
            if job.entries:
                self._put_down(job.entries)
            if job.note is not None:
                job.note()
        finally:
            self.evicted(self.ram.written([e.block for e in job.entries if e.block is not None]))

    def _put_down(self, entries: list[Entry]) -> None:
        """Each tier in turn, nearest first, takes the entries the one above took now (a local
        write, then its upload); once a durable one has them, RAM may let them go."""
        blocks = [e.block for e in entries if e.block is not None]
        taken = entries
        for tier in self.tiers:
            durable = tier.durable
            put = tier.put(taken)
            if put is None:
                return
            taken = put
            if durable:  # those it held already too
                for block in blocks:
                    block.persisted = True

    def evicted(self, victims: list[HotBlock]) -> None:
        """Blocks RAM let go of. Those a durable tier holds are found there; one no tier holds
        any more (no durable tier, or its write failed or did not fit) is dropped, counted."""
        lost = [b for b in victims if not b.persisted]
        if not lost:
            return
        self.count("ram_evictions_unwritten", len(lost))
        if self.durable:  # abnormal: the write failed (the tier's error says why)
            log.warning("RAM budget full: dropped %d cache entries whose disk write failed", len(lost))
        else:  # RAM only, by configuration or since start-up (logged then)
            log.debug("RAM budget full: dropped %d cache entries (disk tier off)", len(lost))

    def spill(self, target_bytes: int) -> int:
        """Shrink RAM to `target_bytes`, the live caches first (their blocks are in the tiers
        already); what no durable tier holds yet is queued and stays until written. Returns
        the bytes released now."""
        live = self.live.shrink_to(0) if self.live is not None else 0
        self.submit(self.ram.unpersisted())
        victims = self.ram.shrink_to(target_bytes)
        self.evicted(victims)
        released = live + sum(b.nbytes for b in victims)
        self.count("ram_bytes_spilled", released)
        return released

    def flush(self, timeout: float | None = None) -> bool:
        """Queue every hot entry no durable tier holds yet (retrying failed writes) and wait
        for the writer, then the tiers' own uploads."""
        self.queue_unwritten()
        return self.wait(timeout)

    def queue_unwritten(self) -> None:
        """Queue every hot entry no durable tier holds yet, failed writes again (on the MLX
        thread: encoding reads MLX arrays)."""
        pending = self.ram.unpersisted()
        held: set[bytes] = set()
        for tier in self.tiers:
            if tier.durable:
                held.update(tier.lookup([b.key for b in pending]))
        self.submit([b for b in pending if b.key not in held])

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the writer, then the tiers' own uploads; True if the writer drained in time."""
        done = self.writer.flush(timeout)
        for tier in self.tiers:
            tier.flush(timeout)
        return done


def encode_hot(block: HotBlock, fingerprint: str) -> bytes:
    """A hot block as a block file's bytes: what every tier below RAM is given to keep."""
    # Parent and depth too: the index can be rebuilt from the files alone.
    meta = {"key": block.key.hex(), "fingerprint": fingerprint, "kind": block.kind,
            "parent": block.parent.hex(), "depth": str(block.index)}
    if block.skeleton:
        meta["skeleton"] = block.skeleton
    return encode_block(block.arrays, block.tokens, meta)
