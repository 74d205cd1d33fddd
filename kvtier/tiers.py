"""The policy over the tiers: which tier to ask (RAM, then each tier below it, nearest
first), what to promote, what to write and evict.

A request sees two calls: `restore` (the longest cached prefix of its prompt, copied into its
buffers, with the snapshot for recurrent layers and the counts: one `Restore`), or
`restore_live` (a live cache of an earlier request taken over: no copy), and `keep`
(afterwards: what it reused is marked used, what it read from a tier made hot, what it
computed stored; `offer_live` keeps its cache live). The rest: spill, flush, pin, stats, close.
The walk over the tiers is lookup.py's, the write path write_path.py's; the tiers below RAM
are tier.Tier, opened by tier_setup.py."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from . import kvstate
from .blocks import BlockRef, Tokens, block_refs
from .closing import close_after_writes
from .config import CacheConfig
from .disk import BlockFiles
from .index import Index
from .kvstate import CachePlan, Layout, PromptBuffers, Snapshot
from .live import LiveCaches, LiveHit
from .lookup import Lookup
from .prefetch import PREFETCH_SLICE_BYTES, Prefetch, plan_prefetch
from .ram import RamTier
from .restored import (
    Hit,
    Match,
    NewEntry,
    Restore,
    SnapshotHit,
    computed_entries,
    restored_entries,
    split_by_tier,
    step_times,
)
from .tier import Tier
from .tier_setup import model_fits, open_tiers
from .write_path import WritePath
from .writer import DiskWriter

__all__ = ["Hit", "Match", "NewEntry", "Restore", "SnapshotHit", "TieredStore"]

COUNTED_TIERS = ("ram", "disk", "shared")  # in every request's counters (the stats schema), and any other tier


class TieredStore:
    """One model's cache over RAM and `tiers` (tier.Tier, nearest first). `disk` (the cache
    directory's LocalDisk) and `shared` are kept for the daemon's admin routes and tests."""

    def __init__(self, config: CacheConfig, fingerprint: str, layout: Layout,
                 plan: CachePlan | None = None, extra_tiers: Sequence[Tier] = ()):
        """`extra_tiers`: more tiers below the configured ones (a test's own tier)."""
        self.config = config
        self.fingerprint = fingerprint
        self.layout = layout
        self.plan = plan
        self.ram = RamTier(config.ram_budget)
        self.counters: Counter[str] = Counter()
        self._counter_lock = threading.Lock()
        # Reads entries ahead of the restore loop: I/O overlaps decoding earlier blocks.
        self._readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kvtier-read")
        opened = open_tiers(config, fingerprint, self.count, self._readers, model_fits(layout, plan))
        self.tiers: list[Tier] = opened.below + list(extra_tiers)
        # The cache directory: its index backs pins and the prefetch; the daemon's cache routes
        # run the CLI's operations (kvtier.ops) on its LocalDisk.
        self._local = opened.disk
        self.disk = opened.disk.disk
        self.shared = opened.shared
        # Finished requests' whole caches, for a next turn to take over (kvtier/live.py).
        self.live = LiveCaches(plan) if plan is not None else None
        self._lookup = Lookup(self.ram, self.tiers, config.block_size, fingerprint,
                              keep_hot=lambda blocks: self._writes.keep_hot(blocks))
        self._writes = WritePath(self.ram, self.tiers, fingerprint, config.write_queue_bytes, self.live,
                                 self._lookup.local_children, self.count)
        self.prefetch: Prefetch | None = None
        self._purges = 0  # forget_hot calls: a prefetch read before one must not be kept

    # -- one request: restore, then keep -----------------------------------------------
    def restore(self, tokens: Sequence[int], into: PromptBuffers) -> Restore:
        """The longest cached prefix of `tokens` this model can restore: its blocks (RAM,
        then each tier below it, nearest first) copied into `into` as each is confirmed, and for
        recurrent layers the snapshot it ends at; never the last token (it is computed, for
        fresh logits). Counted per tier in the stats (the index's request counters: by `keep`)."""
        marks = [time.perf_counter()]
        refs = block_refs(tokens, self.config.block_size, self.fingerprint)
        marks.append(time.perf_counter())
        if self.plan is None:  # the model's cache cannot be stored: nothing to restore
            self.count("requests_unsupported_model")
            found = Match([])
        else:
            found = self.match(refs, tokens, into)
        marks.append(time.perf_counter())
        reuse, snapshot = self._restore_point(refs, tokens, found)
        marks.append(time.perf_counter())
        restored = Restore(found, reuse, snapshot, kept_blocks=found.num_full_blocks(self.config.block_size),
                           restored_bytes=(sum(h.nbytes for h in found.hits) if reuse else 0)
                           + (snapshot.snapshot.nbytes if snapshot else 0))
        self._account(restored, len(tokens))
        marks.append(time.perf_counter())
        restored.steps = step_times(marks)
        return restored

    def restore_live(self, tokens: Sequence[int], hit: LiveHit) -> tuple[Restore, list[Any]] | None:
        """The prefix of `tokens` a live cache holds (`hit`), its cache taken over and trimmed to
        it: no buffers, no copy. None when the tiers may hold a longer prefix (the caller then
        calls `restore`) or the entry was dropped meanwhile. Counted as RAM tokens."""
        assert self.live is not None and self.plan is not None  # hits come from it: a reusable model
        marks = [time.perf_counter()]
        refs = block_refs(tokens, self.config.block_size, self.fingerprint)
        marks.append(time.perf_counter())
        if self._lookup.holds_more(refs, tokens, hit.reuse):
            return None
        prompt_cache = self.live.take(hit)
        if prompt_cache is None:
            return None
        found = self._lookup.held_prefix(refs, tokens, hit.reuse)
        marks += [time.perf_counter()] * 2  # match (lookups and trim); no snapshot to find
        restored = Restore(found, hit.reuse, None, kept_blocks=found.num_full_blocks(self.config.block_size),
                           live_tokens=hit.reuse, prefetched_tokens=hit.reuse if hit.entry.prefetched else 0,
                           restored_bytes=kvstate.held_bytes(prompt_cache, self.plan, self.layout, hit.reuse))
        self._account(restored, len(tokens))
        marks.append(time.perf_counter())
        restored.steps = step_times(marks)
        return restored, prompt_cache

    def offer_live(self, prompt_cache: list[Any], sequence: Sequence[int], epoch: int,
                   prefetched: bool = False) -> bool:
        """Keep a finished request's cache live (it holds `sequence`, or its leading part) while
        it fits in the hot tier's budget beside the blocks; True if it was kept."""
        if self.live is None:
            return False
        kept = self.live.offer(prompt_cache, sequence, epoch, self.ram.budget - self.ram.num_bytes, prefetched)
        self.count("live_kept" if kept else "live_refused")
        return kept

    def keep(self, restored: Restore, prompt_cache: list[Any], sequence: Sequence[int] | None,
             snapshots: dict[int, Snapshot]) -> None:
        """After a request: the entries it reused are now the most recently used and the request
        is counted in the index (both written by the writer thread: an index commit is not worth
        delaying a token for), the
        blocks it read from a tier below RAM become hot, and what it computed is stored
        (`keep_computed`). `sequence` None: it ended before its prefill did, with nothing new
        worth storing."""
        reused = [h.ref.key for h in restored.match.hits]
        self._writes.touch(reused + ([restored.snapshot.key] if restored.snapshot else []))
        if restored.index_counters:
            self._writes.add_counters(restored.index_counters)
            restored.index_counters = {}
        if self.plan is not None:  # else nothing was restored
            self.promote(restored_entries(restored, prompt_cache, self.plan, self.config.block_size))
        if sequence is not None:
            self.keep_computed(restored, prompt_cache, sequence, snapshots)

    def keep_computed(self, restored: Restore, prompt_cache: list[Any], sequence: Sequence[int],
                      snapshots: dict[int, Snapshot]) -> None:
        """Store every block `prompt_cache` holds of `sequence` past those the tiers hold (the
        partly filled last block too), with `snapshots` and one at its end: one disk commit.
        Also before a request ends, for another one waiting for its prompt's blocks."""
        if self.plan is None:
            return
        entries, held = computed_entries(prompt_cache, self.plan, sequence, snapshots, restored.kept_blocks,
                                         self.config.block_size, self.fingerprint)
        self.store(entries)
        restored.kept_blocks = max(restored.kept_blocks, held // self.config.block_size)

    def _restore_point(self, refs: list[BlockRef], tokens: Sequence[int],
                       found: Match) -> tuple[int, SnapshotHit | None]:
        """Tokens to take from the cache: never the whole prompt (the last one is computed),
        and for recurrent layers only up to a boundary that has a snapshot."""
        limit = min(found.num_tokens, len(tokens) - 1)
        if limit <= 0 or self.plan is None or not self.plan.needs_snapshots:
            return max(limit, 0), None
        snapshot = self._lookup.find_snapshot(refs, tokens, limit)
        if snapshot is None:
            self.count("snapshot_misses")
            return 0, None
        return snapshot.position, snapshot

    def _account(self, restored: Restore, num_prompt: int) -> None:
        """Split the restored tokens by the tier each block came from; count the request."""
        deltas = split_by_tier(restored, num_prompt, [*COUNTED_TIERS, *(t.name for t in self.tiers)])
        for name, value in deltas.items():
            self.count(name, value)
        restored.index_counters = deltas  # written by `keep`: an index commit is no step to the first token

    # -- what the engine, routes and pressure watcher ask of the store -------------------
    def register_model(self, description: dict) -> None:
        """Name this store's model in the index, for `kvtier stats` and `ls`."""
        self.disk.note_in_index(self.disk.index.register_model, self.fingerprint, description)

    def health(self) -> dict:
        """Each tier's state: whether the disk tier takes writes (and why not), the shared
        store's connection."""
        body: dict[str, Any] = {}
        for tier in self.tiers:
            body.update(tier.health())
        return body

    def hot_bytes(self) -> int:
        """The hot tier's blocks and the live caches: what its budget bounds, and this model's
        KV in memory (beside its weights) for the daemon's memory budget."""
        return self.ram.num_bytes + (self.live.nbytes if self.live is not None else 0)

    def is_hot(self, key: bytes) -> bool:
        return key in self.ram

    def forget_hot(self) -> None:
        """Drop every hot copy (after a purge: RAM must not serve what was purged), the live
        caches too, and those requests hold now when they end."""
        self._purges += 1
        self.ram.clear()
        if self.live is not None:
            self.live.clear()

    def wait_for_writes(self, timeout: float | None = None) -> bool:
        """Wait until the queued disk writes are done; True if they were in time."""
        return self.writer.flush(timeout)

    def count(self, name: str, amount: int = 1) -> None:
        with self._counter_lock:
            self.counters[name] += amount

    # -- the cache directory, as the routes, tests and bench/ look at it ----------------------
    @property
    def index(self) -> Index:
        return self.disk.index

    @property
    def files(self) -> BlockFiles:
        return self.disk.files

    @property
    def swept(self) -> threading.Event:
        return self.disk.swept

    @property
    def disk_error(self) -> str | None:
        """Why the disk tier does not take every write now; None when it does."""
        return self.disk.disk_error

    @property
    def disk_enabled(self) -> bool:
        return self.disk.disk_enabled

    def disk_used(self) -> int:
        return self.disk.disk_used()

    @property
    def writer(self) -> DiskWriter:
        return self._writes.writer

    # -- lookup (lookup.py) --------------------------------------------------------------
    def match(self, refs: list[BlockRef], tokens: Tokens, into: PromptBuffers | None = None) -> Match:
        """The longest cached prefix of `tokens` (Lookup.match)."""
        return self._lookup.match(refs, tokens, into)

    def pin_prefix(self, tokens: Tokens, pinned: bool = True) -> int:
        """Pin (or unpin) on disk every entry that holds part of `tokens`: its full blocks,
        the block continuing its tail, and the snapshots along the way."""
        return self.index.set_pinned(self._lookup.prefix_keys(tokens), pinned)

    # -- store (write_path.py) -------------------------------------------------------------
    def store(self, entries: list[NewEntry]) -> None:
        """Keep a request's new blocks and snapshots hot; queue them for the tiers (WritePath.store)."""
        self._writes.store(entries)

    def promote(self, entries: list[NewEntry]) -> None:
        """Blocks a request read from a tier below RAM: hot from now on (WritePath.promote)."""
        self._writes.promote(entries)

    def retry_writes(self) -> None:
        """Once the disk takes writes again, queue what RAM holds unwritten (on the MLX
        thread: encoding reads MLX arrays; the daemon calls it when no request comes)."""
        self._writes.retry_writes()

    def spill(self, target_bytes: int) -> int:
        """Shrink the hot tier to `target_bytes` (memory pressure). The live caches go first
        (their blocks are in the tiers already). Entries not yet on disk are queued for it and
        stay until written (then RAM evicts down to its budget; the next spill goes further).
        Returns the bytes released now."""
        if self.prefetch is not None:
            self.prefetch.end("memory pressure")
        return self._writes.spill(target_bytes)

    # -- start-up prefetch (kvtier/prefetch.py): the cache directory's newest entries ------
    def plan_prefetch(self, budget: int) -> Prefetch:
        """Plan the start-up prefetch: up to `budget` bytes and the hot tier's free room."""
        room = min(budget, self.ram.budget - self.hot_bytes())
        index = self.index if self.plan is not None and self.disk_enabled else None
        self.prefetch = plan_prefetch(index, self.fingerprint, self.ram, room, self._purges)
        return self.prefetch

    def prefetch_step(self, entries: int = 32, max_bytes: int = PREFETCH_SLICE_BYTES) -> bool:
        """One slice of the prefetch (Prefetch.step), its files read in parallel and checked as
        a restore reads them; False once it has ended. Runs on the MLX thread, between
        requests: a request waits for one slice at most."""
        if self.prefetch is None:
            return False
        return self.prefetch.step(self._local.read_hot, self.ram, lambda: self.ram.budget - self.hot_bytes(),
                                  lambda: self._purges, entries, max_bytes)

    # -- lifecycle ---------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Persist every hot entry not yet on disk (retrying failed writes) and wait."""
        return self._writes.flush(timeout)

    def close(self) -> None:
        self.close_soon().join()

    def close_soon(self) -> threading.Thread:
        """Close once its writes are done, on a thread of its own (kvtier/closing.py)."""
        if self.live is not None:
            self.live.clear()
        return close_after_writes(self._writes, self._readers, self.tiers, self.fingerprint)

    def stats(self) -> dict:
        queued_jobs, queued_bytes = self.writer.pending
        with self._counter_lock:
            counters = dict(self.counters)
        ram = self.ram.stats()
        below = {tier.name: tier.stats() for tier in self.tiers}
        below[self._local.name].update(queued_jobs=queued_jobs, queued_bytes=queued_bytes)  # the writer's
        # "blocks": the old name of "entries" (blocks and snapshots), kept for existing clients.
        return {
            "ram": dict(ram, entries=ram["blocks"]),
            "shared": None,  # the stats schema's section, absent a shared store
            **below,
            "live": {"entries": len(self.live) if self.live is not None else 0,
                     "bytes": self.live.nbytes if self.live is not None else 0},
            "prefetch": self.prefetch.stats() if self.prefetch is not None else None,
            "block_size": self.config.block_size,
            "counters": counters,
        }
