"""The policy over the tiers: which tier to ask (RAM, then disk, then the shared store),
what to promote, what to write and evict.

A request sees two calls: `restore` (the longest cached prefix of its prompt, copied into its
buffers, with the snapshot for recurrent layers and the counts: one `Restore`), or
`restore_live` (a live cache of an earlier request taken over: no copy), and `keep`
(afterwards: what it reused is marked used, what it read from disk made hot, what it
computed stored; `offer_live` keeps its cache live). The rest: spill, flush, pin, stats, close."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from . import kvstate
from .blocks import BlockRef, Tokens, block_refs, common_prefix, root_key, snapshot_ref, tokens_hash
from .checks import check_block
from .config import CacheConfig
from .disk import BlockFiles, DamagedBlock, ParsedBlock, encode_block, to_mlx
from .index import BlockRecord, Index, now_ms
from .kvstate import BlockArrays, CachePlan, Layout, PromptBuffers, Snapshot, matches_layout, nbytes, snapshot_matches
from .live import LiveCaches, LiveHit
from .local import LocalDisk
from .prefetch import PREFETCH_SLICE_BYTES, Prefetch, plan_prefetch
from .ram import HotBlock, RamTier
from .readahead import READ_AHEAD_BYTES, ReadAhead, first_bytes
from .shared import SharedTier
from .shared_io import SharedIO, SharedSize
from .writer import DiskWriter, Entry, WriteJob

log = logging.getLogger("kvtier.tiers")


@dataclass
class Hit:
    """One block of a matched prefix: hot in RAM, or just read from its file on disk."""

    ref: BlockRef
    tokens: np.ndarray
    usable: int  # its leading tokens that equal the prompt's
    nbytes: int
    hot: HotBlock | None = None  # the block in RAM
    parsed: ParsedBlock | None = None  # or its file, as numpy views over the bytes read
    origin: str = "disk"  # where `parsed` was read: "disk" or "shared"

    @property
    def source(self) -> str:
        return "ram" if self.hot is not None else self.origin

    @property
    def arrays(self) -> dict:
        """MLX arrays when hot, numpy views of the file when read from disk."""
        if self.hot is not None:
            return self.hot.arrays
        assert self.parsed is not None, "the file's arrays were released"
        return self.parsed.tensors

    def release(self) -> None:
        """Let go of the file's bytes once they have been copied where they are needed."""
        self.parsed = None


@dataclass
class Match:
    hits: list[Hit]

    @property
    def sources(self) -> list[str]:
        return [h.source for h in self.hits]

    @property
    def usable(self) -> list[int]:
        return [h.usable for h in self.hits]

    def num_full_blocks(self, block_size: int) -> int:
        """Blocks of `block_size` tokens used whole. Not a partial tail used whole: the
        request stores the full block that replaces it."""
        return sum(1 for h in self.hits if h.usable == len(h.tokens) == block_size)

    @property
    def num_tokens(self) -> int:
        return sum(self.usable)

    def add(self, hit: Hit, into: PromptBuffers | None) -> None:
        """One more block of the prefix; copied into `into` at once (later files are still
        being read) unless its file was read straight into it, then its file's bytes are let go."""
        self.hits.append(hit)
        if into is not None:
            if hit.parsed is not None and hit.parsed.in_place:
                into.claim(hit.ref.index * len(hit.tokens), hit.usable)
            else:
                into.add(hit.arrays, hit.usable)
            hit.release()


@dataclass
class SnapshotHit:
    key: bytes
    position: int  # prompt tokens the snapshot covers
    snapshot: Snapshot
    source: str


@dataclass
class Restore:
    """What `TieredStore.restore` took from the cache for one prompt, and what `keep` needs
    once the request is done."""

    match: Match  # the cached blocks found (all copied into the prompt's buffers)
    reuse: int  # prompt tokens restored: never the last; for recurrent layers a snapshot's position
    snapshot: SnapshotHit | None  # the recurrent layers' state at `reuse`
    ram_tokens: int = 0  # `reuse`, by the tier its blocks came from (a live cache's: RAM)
    disk_tokens: int = 0
    shared_tokens: int = 0
    live_tokens: int = 0  # of `ram_tokens`, those of a live cache taken over (all of them, or none)
    prefetched_tokens: int = 0  # of `ram_tokens`, those the start-up prefetch read from disk
    restored_bytes: int = 0  # KV and snapshot bytes of the restored prefix
    steps: dict[str, float] = field(default_factory=dict)  # seconds: hash, match, snapshot, account
    kept_blocks: int = 0  # full blocks of the request's tokens the tiers hold: new ones follow
    index_counters: dict[str, int] = field(default_factory=dict)  # the request's counts, for `keep`

    @property
    def cached_tokens(self) -> int:
        return self.ram_tokens + self.disk_tokens + self.shared_tokens


@dataclass
class NewEntry:
    """A block or snapshot computed by a request, to be kept hot and written to disk."""

    ref: BlockRef
    tokens: Sequence[int] | np.ndarray
    arrays: BlockArrays
    kind: str = "kv"
    skeleton: str | None = None
    source: str = "computed"  # or the tier a restored block was read from ("disk", "shared")


def _step_times(marks: list[float]) -> dict[str, float]:
    """Seconds of a restore's steps, from the clock read at each step's end (and before)."""
    return {name: b - a for name, a, b in zip(("hash", "match", "snapshot", "account"), marks, marks[1:])}


class TieredStore:
    def __init__(self, config: CacheConfig, fingerprint: str, layout: Layout,
                 plan: CachePlan | None = None):
        self.config = config
        self.fingerprint = fingerprint
        self.layout = layout
        self.plan = plan
        self.ram = RamTier(config.ram_budget)
        self.counters: Counter[str] = Counter()
        self._counter_lock = threading.Lock()
        # The local SSD tier; the daemon's cache routes run the CLI's operations (kvtier.ops) on it.
        self.disk = LocalDisk.open(config.cache_dir, config.disk_budget, self.count, fingerprint)
        self.writer = DiskWriter(self._write_then_release, config.write_queue_bytes)
        # Reads files ahead of the restore loop: disk I/O overlaps decoding earlier blocks.
        self._readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kvtier-read")
        self.shared = (SharedTier(config.shared_url, fingerprint, self.count, config.shared_ttl)
                       if config.shared_url else None)
        self._shared_io = (SharedIO(self.shared, self._readers, fingerprint, self._fits_model, self.count)
                           if self.shared is not None else None)
        # Finished requests' whole caches, for a next turn to take over (kvtier/live.py).
        self.live = LiveCaches(plan) if plan is not None else None
        self.prefetch: Prefetch | None = None
        self._purges = 0  # forget_hot calls: a prefetch read before one must not be kept

    # -- one request: restore, then keep -----------------------------------------------
    def restore(self, tokens: Sequence[int], into: PromptBuffers) -> Restore:
        """The longest cached prefix of `tokens` this model can restore: its blocks (RAM,
        then disk, then the shared store) copied into `into` as each is confirmed, and for
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
        restored.steps = _step_times(marks)
        return restored

    def restore_live(self, tokens: Sequence[int], hit: LiveHit) -> tuple[Restore, list[Any]] | None:
        """The prefix of `tokens` a live cache holds (`hit`), its cache taken over and trimmed to
        it: no buffers, no copy. None when the tiers may hold a longer prefix (the caller then
        calls `restore`) or the entry was dropped meanwhile. Counted as RAM tokens."""
        assert self.live is not None and self.plan is not None  # hits come from it: a reusable model
        marks = [time.perf_counter()]
        refs = block_refs(tokens, self.config.block_size, self.fingerprint)
        marks.append(time.perf_counter())
        if self._holds_more(refs, tokens, hit.reuse):
            return None
        prompt_cache = self.live.take(hit)
        if prompt_cache is None:
            return None
        found = self._held_prefix(refs, tokens, hit.reuse)
        marks += [time.perf_counter()] * 2  # match (lookups and trim); no snapshot to find
        restored = Restore(found, hit.reuse, None, kept_blocks=found.num_full_blocks(self.config.block_size),
                           live_tokens=hit.reuse, prefetched_tokens=hit.reuse if hit.entry.prefetched else 0,
                           restored_bytes=kvstate.held_bytes(prompt_cache, self.plan, self.layout, hit.reuse))
        self._account(restored, len(tokens))
        marks.append(time.perf_counter())
        restored.steps = _step_times(marks)
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
        is counted in the index (index writes are not worth delaying its first token for), the
        blocks it read from disk or the shared store become hot, and what it computed is stored
        (`keep_computed`). `sequence` None: it ended before its prefill did, with nothing new
        worth storing."""
        reused = [h.ref.key for h in restored.match.hits]
        self._touch(reused + ([restored.snapshot.key] if restored.snapshot else []))
        if restored.index_counters:
            self._note_in_index(self.disk.index.add_counters, self.fingerprint, restored.index_counters)
            restored.index_counters = {}
        self._promote_restored(restored, prompt_cache)
        if sequence is not None:
            self.keep_computed(restored, prompt_cache, sequence, snapshots)

    def keep_computed(self, restored: Restore, prompt_cache: list[Any], sequence: Sequence[int],
                      snapshots: dict[int, Snapshot]) -> None:
        """Store every block `prompt_cache` holds of `sequence` past those the tiers hold (the
        partly filled last block too), with `snapshots` and one at its end: one disk commit.
        Also before a request ends, for another one waiting for its prompt's blocks."""
        if self.plan is None:
            return
        size, snapshots = self.config.block_size, dict(snapshots)
        held_count = kvstate.cached_tokens(prompt_cache)
        held = list(sequence[: len(sequence) if held_count is None else held_count])
        if self.plan.needs_snapshots and held:
            snapshots[len(held)] = kvstate.take_snapshot(prompt_cache, self.plan)
        refs = block_refs(held, size, self.fingerprint, partial_tail=True)
        entries = []
        for ref in refs[restored.kept_blocks:]:
            start, end = ref.index * size, min((ref.index + 1) * size, len(held))
            arrays = kvstate.slice_block(prompt_cache, self.plan, start, end)
            entries.append(NewEntry(ref, held[start:end], arrays))
        for position, snapshot in sorted(snapshots.items()):
            if position <= len(held):
                ref = snapshot_ref(refs, held, position, size, self.fingerprint)
                entries.append(NewEntry(ref, held[ref.index * size : position], snapshot.arrays, "snap",
                                        snapshot.skeleton))
        self.store(entries)
        restored.kept_blocks = max(restored.kept_blocks, len(held) // size)

    def _restore_point(self, refs: list[BlockRef], tokens: Sequence[int],
                       found: Match) -> tuple[int, SnapshotHit | None]:
        """Tokens to take from the cache: never the whole prompt (the last one is computed),
        and for recurrent layers only up to a boundary that has a snapshot."""
        limit = min(found.num_tokens, len(tokens) - 1)
        if limit <= 0 or self.plan is None or not self.plan.needs_snapshots:
            return max(limit, 0), None
        snapshot = self._find_snapshot(refs, tokens, limit)
        if snapshot is None:
            self.count("snapshot_misses")
            return 0, None
        return snapshot.position, snapshot

    def _account(self, restored: Restore, num_prompt: int) -> None:
        """Split the restored tokens by the tier each block came from; count the request."""
        reuse, left = restored.reuse, restored.reuse
        if restored.live_tokens:  # a live cache is in memory: all of it counts as RAM's
            restored.ram_tokens, left = reuse, 0
        for hit in restored.match.hits:
            n = min(hit.usable, left)
            setattr(restored, f"{hit.source}_tokens", getattr(restored, f"{hit.source}_tokens") + n)
            if hit.hot is not None and hit.hot.prefetched:
                restored.prefetched_tokens += n
            left -= n
        deltas = {"tokens_from_ram": restored.ram_tokens, "tokens_from_disk": restored.disk_tokens,
                  "tokens_from_shared": restored.shared_tokens, "tokens_from_live": restored.live_tokens,
                  "requests_live": int(restored.live_tokens > 0),
                  "tokens_computed": num_prompt - restored.cached_tokens,
                  "requests_hit" if reuse else "requests_miss": 1,
                  # A "hit" of 3 tokens is still a cold request: count the ones served mostly
                  # from the cache apart.
                  "requests_half_cached": int(2 * reuse >= num_prompt)}
        for name, value in deltas.items():
            self.count(name, value)
        restored.index_counters = deltas  # written by `keep`: an index commit is no step to the first token

    def _holds_more(self, refs: list[BlockRef], tokens: Sequence[int], n: int) -> bool:
        """True when the local tiers may give more of `tokens` than its first `n`: they hold
        the block that would cover token `n`, or a tail block sharing more of it (a lookup,
        nothing read; the shared store is not asked)."""
        size = self.config.block_size
        if n >= len(tokens) - 1:  # the last token is always computed: no tier gives more
            return False
        j = n // size
        if j < len(refs) and (refs[j].key in self.ram or self.index.get(refs[j].key) is not None):
            return True
        parent = refs[j - 1].key if j else root_key(self.fingerprint)
        tail = np.asarray(tokens[j * size :], np.uint32)
        return any(common_prefix(t, tail) > n - j * size for t in self._children(parent, first=int(tail[0])).values())

    def _held_prefix(self, refs: list[BlockRef], tokens: Sequence[int], n: int) -> Match:
        """The full blocks of the first `n` tokens the tiers hold, in chain order (looked up,
        not read): what a live restore marks used and `keep` need not store again."""
        size, found = self.config.block_size, Match([])
        chain = refs[: n // size]
        records = self.index.get_many([r.key for r in chain if r.key not in self.ram])
        for ref in chain:
            block_tokens = np.asarray(tokens[ref.index * size : (ref.index + 1) * size], np.uint32)
            hot = self.ram.get(ref.key)
            if hot is not None and hot.kind == "kv" and np.array_equal(hot.tokens, block_tokens):
                found.hits.append(Hit(ref, hot.tokens, size, hot.nbytes, hot=hot))
            elif hot is None and ref.key in records and records[ref.key].kind == "kv":
                found.hits.append(Hit(ref, block_tokens, size, records[ref.key].nbytes))  # `keep` makes it hot
            else:
                break
        return found

    def _promote_restored(self, restored: Restore, prompt_cache: list[Any]) -> None:
        """Blocks read from disk or the shared store become hot, cut from the cache they were
        copied into; only those wholly before `reuse` (the cache holds computed tokens after it)."""
        if self.plan is None:  # nothing was restored
            return
        size, entries = self.config.block_size, []
        for h in restored.match.hits:
            start = h.ref.index * size
            if h.source != "ram" and h.usable == size and start + size <= restored.reuse:
                entries.append(NewEntry(h.ref, h.tokens, kvstate.slice_block(prompt_cache, self.plan, start,
                                                                             start + size), source=h.source))
        self.promote(entries)

    # -- what the engine, routes and pressure watcher ask of the store -------------------
    def register_model(self, description: dict) -> None:
        """Name this store's model in the index, for `kvtier stats` and `ls`."""
        self._note_in_index(self.disk.index.register_model, self.fingerprint, description)

    def health(self) -> dict:
        """Whether the disk tier takes writes (and why not), and the shared store's state."""
        body: dict[str, Any] = {"disk_writable": self.disk_error is None, "disk_error": self.disk_error}
        if self.shared is not None:  # an unreachable shared store degrades nothing
            body.update(shared_connected=self.shared.connected, shared_error=self.shared.error)
        return body

    @property
    def hot_bytes(self) -> int:
        """The hot tier's blocks and the live caches: what its budget bounds."""
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

    # -- the local disk tier, as tests and bench/ look at it ---------------------------
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

    def _note_in_index(self, write: Callable[..., Any], *args: Any) -> None:
        """Best-effort index bookkeeping: a full or read-only disk must not fail a request."""
        self.disk.note_in_index(write, *args)

    # -- lookup ------------------------------------------------------------------------
    def match(self, refs: list[BlockRef], tokens: Tokens, into: PromptBuffers | None = None) -> Match:
        """The longest cached prefix of `tokens`: a chain of full blocks, RAM first then disk,
        then the leading part of one more cached block that continues the chain. Blocks read
        from disk are read straight into `into` (or arrive as numpy views of their files:
        `promote` makes them hot later); each counts once confirmed, while later files are
        still being read."""
        size = self.config.block_size
        tokens = np.asarray(tokens, np.uint32)
        found = Match([])
        reads, remote = self._read_ahead(refs, into), None
        try:
            for ref in refs:
                block_tokens = tokens[ref.index * size : (ref.index + 1) * size]
                hit = self._lookup(ref, block_tokens, reads.take(ref.key))
                if hit is None and self._shared_io is not None:  # the local chain ends: the team's may go on
                    remote = remote or self._shared_io.read_ahead(refs[ref.index :])
                    hit = self._lookup_shared(ref, block_tokens, "kv", remote.take(ref.key))
                if hit is None or len(hit.tokens) != size:
                    break
                found.add(hit, into)
        finally:
            for pending in (reads, remote):
                if pending is not None:
                    pending.cancel()  # the chain ended before these
        parent = found.hits[-1].ref.key if found.hits else root_key(self.fingerprint)
        self._match_tail(parent, len(found.hits), tokens[len(found.hits) * size :], found, into)
        return found

    def _find_snapshot(self, refs: list[BlockRef], tokens: Tokens, limit: int) -> SnapshotHit | None:
        """The snapshot at the largest position <= `limit` whose prefix equals the prompt's."""
        size = self.config.block_size
        tokens = np.asarray(tokens, np.uint32)
        for j in range(min(limit // size, len(refs)), -1, -1):
            anchor = refs[j - 1].key if j else root_key(self.fingerprint)
            candidates = self._children(anchor, "snap", remote=True)
            for key, after in sorted(candidates.items(), key=lambda kv: -len(kv[1])):
                position = j * size + len(after)
                if position > limit or position == 0:
                    continue
                if not np.array_equal(after, tokens[j * size : position]):
                    continue
                found = self._lookup_snapshot(BlockRef(key, anchor, j), np.asarray(after, np.uint32))
                if found is not None:
                    block, source = found
                    return SnapshotHit(key, position, Snapshot(block.arrays, block.skeleton or ""), source)
        return None

    def _children(self, parent: bytes, kind: str = "kv", remote: bool = False,
                  first: int | None = None) -> dict[bytes, np.ndarray]:
        """Tokens of every entry of `kind` that continues `parent`, hot or on disk (and, if
        `remote`, listed by the shared store: candidates only, checked when read); with
        `first`, only those starting with that token (the index reads just those)."""
        def wanted(tokens: np.ndarray) -> bool:
            return first is None or (len(tokens) > 0 and tokens[0] == first)

        children = {b.key: b.tokens for b in self.ram.children(parent, kind) if wanted(b.tokens)}
        for key, raw in self.index.children(parent, kind, first):
            children.setdefault(key, np.frombuffer(raw, dtype="<u4"))
        if remote and self.shared is not None:
            for key, tokens in self.shared.children(parent, kind).items():
                if wanted(tokens):
                    children.setdefault(key, tokens)
        return children

    def _touch(self, keys: list[bytes]) -> None:
        if keys:
            self.ram.touch_chain(keys)
            self._note_in_index(self.index.touch, keys, now_ms())

    def _read_ahead(self, refs: list[BlockRef], into: PromptBuffers | None) -> ReadAhead[BlockRecord]:
        """Read the files of the chain's blocks that are on disk only, in order, up to the
        first one the index does not hold (the chain cannot go past it): straight into
        `into` at each block's tokens, when given (a chain is used from its first block on,
        so a block is used at exactly its place in the prompt)."""
        cold = [ref for ref in refs if ref.key not in self.ram]
        records = self.index.get_many([ref.key for ref in cold])
        planned = []
        for ref in cold:
            if ref.key not in records:
                break
            planned.append((ref, records[ref.key]))
        if into is None:
            return ReadAhead(self._readers, self.disk.read_parsed, planned)
        # The buffers' views wait for MLX's zero-fill (~50 ms per 136 MB here): the disk starts meanwhile.
        self._readers.submit(self.disk.files.will_need, first_bytes(planned, READ_AHEAD_BYTES))
        size = self.config.block_size
        targets = {ref.hex: into.views_at(ref.index * size, size) for ref, _ in planned}

        def read_into(key_hex: str, record: BlockRecord) -> ParsedBlock:
            return self.disk.read_into(key_hex, record, targets.pop(key_hex))
        return ReadAhead(self._readers, read_into, planned)

    def _lookup(self, ref: BlockRef, block_tokens: np.ndarray,
                pending: tuple[BlockRecord, Future] | None = None, shared: bool = False) -> Hit | None:
        """The block at `ref` if its tokens start as `block_tokens` do (all of them, or the
        leading part when it is the tail): from RAM, else read and checked from disk. A block
        whose read is `pending` is taken from it, even if RAM has it by now: that read may
        be writing into the prompt's buffers."""
        block = self.ram.get(ref.key) if pending is None else None
        if block is not None:
            if block.kind != "kv" or not np.array_equal(block.tokens[: len(block_tokens)], block_tokens):
                return None
            return Hit(ref, block.tokens, len(block_tokens), block.nbytes, hot=block)
        parsed = self._read_checked(ref, block_tokens, "kv", *(pending or (None, None)))
        if parsed is None:
            if shared and self.shared is not None:  # a tail candidate the store may list
                return self._lookup_shared(ref, block_tokens, "kv")
            return None
        return Hit(ref, parsed.tokens.copy(), len(block_tokens), parsed.nbytes, parsed=parsed)

    def _lookup_shared(self, ref: BlockRef, block_tokens: np.ndarray, kind: str,
                       pending: tuple[SharedSize, Future] | None = None) -> Hit | None:
        """The block at `ref` from the shared store, checked (SharedIO.read): a hit or a miss."""
        assert self._shared_io is not None  # asked only when there is a shared tier
        parsed = self._shared_io.read(ref, block_tokens, kind, pending)
        if parsed is None:
            return None
        return Hit(ref, parsed.tokens.copy(), len(block_tokens), parsed.nbytes, parsed=parsed, origin="shared")

    def _lookup_snapshot(self, ref: BlockRef, after: np.ndarray) -> tuple[HotBlock, str] | None:
        block = self.ram.get(ref.key)
        if block is not None:
            return (block, "ram") if block.kind == "snap" else None
        parsed, source = self._read_checked(ref, after, "snap"), "disk"
        if parsed is None and self.shared is not None:
            hit = self._lookup_shared(ref, after, "snap")
            parsed, source = (hit.parsed, "shared") if hit is not None else (None, source)
        if parsed is None:
            return None
        try:
            block = HotBlock(ref.key, ref.parent, ref.index, parsed.tokens, to_mlx(parsed), parsed.nbytes,
                             kind="snap", skeleton=parsed.metadata.get("skeleton"),
                             persisted=source == "disk", shared=source == "shared")
        except DamagedBlock as exc:
            self._damaged(ref, exc)
            return None
        if source == "shared":
            self._submit([block])  # kept locally from now on
        self._put_hot([block])
        return block, source

    def _match_tail(self, parent: bytes, index: int, tail: np.ndarray, found: Match,
                    into: PromptBuffers | None) -> None:
        """Reuse the leading tokens of a cached child block: a block's KV for its first k
        tokens depends only on the prefix, so a repeated or extended prompt reuses them."""
        if len(tail) == 0:
            return
        first = int(tail[0])  # only a child starting with it shares any token with the tail
        candidates = self._children(parent, first=first)
        if self.shared is not None and max((common_prefix(t, tail) for t in candidates.values()), default=0) < len(tail):
            candidates = self._children(parent, remote=True, first=first)  # the team may have a longer one
        best = max(candidates.items(), key=lambda kv: common_prefix(kv[1], tail), default=None)
        if best is None or common_prefix(best[1], tail) == 0:
            return
        key, block_tokens = best
        hit = self._lookup(BlockRef(key, parent, index), np.asarray(block_tokens, np.uint32), shared=True)
        if hit is not None:
            hit.usable = common_prefix(hit.tokens, tail)
            found.add(hit, into)

    def _read_checked(self, ref: BlockRef, block_tokens: np.ndarray, kind: str,
                      record: BlockRecord | None = None, read: Future | None = None) -> ParsedBlock | None:
        """A file read and checked against its index record, its tokens and this model's
        layout; a damaged one is counted, dropped and reported as a miss (None)."""
        record = record or self.index.get(ref.key)
        if record is None or record.kind != kind:
            return None
        if record.fingerprint != self.fingerprint or record.tokens_hash != tokens_hash(block_tokens):
            self.count("key_collisions")
            return None
        try:
            parsed = read.result() if read else self.disk.read_parsed(ref.hex, record)
            check_block(parsed, ref.key, kind, fingerprint=self.fingerprint, tokens=block_tokens, fits=self._fits_model)
        except DamagedBlock as exc:
            self._damaged(ref, exc)
            return None
        return parsed

    def _damaged(self, ref: BlockRef, exc: DamagedBlock) -> None:
        self.disk.drop_damaged(ref.key, exc)

    def _fits_model(self, parsed: ParsedBlock, kind: str) -> bool:
        if kind == "kv":
            shapes = {name: t.shape for name, t in parsed.tensors.items()}
            return matches_layout(shapes, parsed.dtypes, self.layout, len(parsed.tokens))
        return self.plan is not None and snapshot_matches(parsed.metadata.get("skeleton") or "", self.plan)

    def pin_prefix(self, tokens: Tokens, pinned: bool = True) -> int:
        """Pin (or unpin) on disk every entry that holds part of `tokens`: its full blocks,
        the block continuing its tail, and the snapshots along the way."""
        size = self.config.block_size
        refs = block_refs(tokens, size, self.fingerprint)
        tokens = np.asarray(tokens, np.uint32)
        anchors = [root_key(self.fingerprint)] + [r.key for r in refs]
        keys = [r.key for r in refs]
        tail = tokens[len(refs) * size :]
        keys += [k for k, child in self._children(anchors[-1]).items() if common_prefix(child, tail) > 0]
        for j, anchor in enumerate(anchors):
            window = tokens[j * size : (j + 1) * size]
            keys += [k for k, after in self._children(anchor, "snap").items()
                     if common_prefix(after, window) == len(after)]
        return self.index.set_pinned(keys, pinned)

    # -- store -------------------------------------------------------------------------
    def store(self, entries: list[NewEntry]) -> None:
        """Keep a request's new blocks and snapshots hot; queue them for the disk together.
        They are queued first, so RAM holds them (findable) until their files are indexed.

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
        self._submit(blocks, removed)
        self._put_hot(blocks)

    def retry_writes(self) -> None:
        """Once the disk takes writes again, queue what RAM holds unwritten (on the MLX
        thread: encoding reads MLX arrays; the daemon calls it when no request comes)."""
        if self.disk.take_retry():
            self._submit(self.ram.unpersisted())

    def promote(self, entries: list[NewEntry]) -> None:
        """Blocks a request read from disk or the shared store, cut back out of the cache
        they were restored into: hot from now on. Those from disk are not written again
        (their files hold the same bits); those from the shared store are kept on the local
        disk too, and not uploaded again."""
        blocks = [HotBlock(e.ref.key, e.ref.parent, e.ref.index, np.asarray(e.tokens, np.uint32), e.arrays,
                           nbytes(e.arrays), persisted=e.source != "shared", shared=e.source == "shared")
                  for e in entries if e.ref.key not in self.ram]
        self._submit([b for b in blocks if b.shared])
        self._put_hot(blocks)

    def _put_hot(self, blocks: list[HotBlock]) -> None:
        """Into the hot tier. The live caches count against its budget and make room first:
        dropped (oldest first) before any block is evicted for these."""
        if self.live is not None:
            room = self.ram.budget - self.ram.num_bytes - sum(b.nbytes for b in blocks)
            if self.live.shrink_to(max(room, 0)):
                self.count("live_dropped")
        for block in blocks:
            self._evicted(self.ram.put(block))

    def _covered_partials(self, block: HotBlock) -> list[bytes]:
        return [key for key, tokens in self._children(block.parent, first=int(block.tokens[0]) if len(block.tokens) else None).items()
                if key != block.key and len(tokens) < len(block.tokens)
                and common_prefix(tokens, block.tokens) == len(tokens)]

    def _submit(self, blocks: list[HotBlock], removed: Sequence[bytes] = ()) -> None:
        """Queue blocks for the disk; RAM holds them until the write is done, so a block is
        findable from the moment it is computed (the overshoot is bounded by the queue)."""
        if not self.disk_enabled:
            if self._shared_io is not None:  # no local copy to wait for
                self._shared_io.upload([Entry(b.key, self._encode(b), b) for b in blocks if not b.shared])
            return
        entries = [Entry(key, None) for key in removed]  # ordered after their pending writes
        entries += [Entry(block.key, self._encode(block), block) for block in blocks]
        if entries:
            self.ram.hold(blocks)
            self.writer.submit(WriteJob(entries))

    def _encode(self, block: HotBlock) -> bytes:
        # Parent and depth too: the index can be rebuilt from the files alone.
        meta = {"key": block.key.hex(), "fingerprint": self.fingerprint, "kind": block.kind,
                "parent": block.parent.hex(), "depth": str(block.index)}
        if block.skeleton:
            meta["skeleton"] = block.skeleton
        return encode_block(block.arrays, block.tokens, meta)

    def _write_then_release(self, job: WriteJob) -> None:
        """Runs on the writer thread: write the job, then let RAM evict its blocks again
        (after the index commit, so a lookup finds each one in RAM or on disk throughout)."""
        try:
            self._write_job(job)
        finally:
            self._evicted(self.ram.written([e.block for e in job.entries if e.block is not None]))

    def _evicted(self, victims: list[HotBlock]) -> None:
        """Blocks RAM let go of. Those on disk are found there; one no tier holds any more
        (the disk tier is off, or its write failed or did not fit) is dropped, counted."""
        lost = [b for b in victims if not b.persisted]
        if not lost:
            return
        self.count("ram_evictions_unwritten", len(lost))
        if self.disk_enabled:  # abnormal: the write failed (disk.error says why)
            log.warning("RAM budget full: dropped %d cache entries whose disk write failed", len(lost))
        else:  # RAM only, by configuration or since start-up (logged then)
            log.debug("RAM budget full: dropped %d cache entries (disk tier off)", len(lost))

    # -- disk writer (runs on the writer thread) -----------------------------------------
    def _write_job(self, job: WriteJob) -> None:
        """Runs on the writer thread: the disk tier writes the job; what it indexed is on
        disk from now on, and goes to the shared store next (after the local write)."""
        indexed = self.disk.write_job(job)
        if indexed is None:
            return
        for entry in job.entries:  # those it found indexed already too
            if entry.block is not None:
                entry.block.persisted = True
        written = {key for key, _, _ in indexed}
        if self._shared_io is not None:
            self._shared_io.upload([e for e in job.entries if e.key in written])


    def spill(self, target_bytes: int) -> int:
        """Shrink the hot tier to `target_bytes` (memory pressure). The live caches go first
        (their blocks are in the tiers already). Entries not yet on disk are queued for it and
        stay until written (then RAM evicts down to its budget; the next spill goes further).
        Returns the bytes released now."""
        if self.prefetch is not None:
            self.prefetch.end("memory pressure")
        live = self.live.shrink_to(0) if self.live is not None else 0
        self._submit(self.ram.unpersisted())
        victims = self.ram.shrink_to(target_bytes)
        self._evicted(victims)
        released = live + sum(b.nbytes for b in victims)
        self.count("ram_bytes_spilled", released)
        return released

    # -- start-up prefetch (kvtier/prefetch.py) ---------------------------------------
    def plan_prefetch(self, budget: int) -> Prefetch:
        """Plan the start-up prefetch: up to `budget` bytes and the hot tier's free room."""
        room = min(budget, self.ram.budget - self.hot_bytes)
        index = self.index if self.plan is not None and self.disk_enabled else None
        self.prefetch = plan_prefetch(index, self.fingerprint, self.ram, room, self._purges)
        return self.prefetch

    def prefetch_step(self, entries: int = 32, max_bytes: int = PREFETCH_SLICE_BYTES) -> bool:
        """One slice of the prefetch (Prefetch.step), its files read in parallel and checked as
        a restore reads them; False once it has ended. Runs on the MLX thread, between
        requests: a request waits for one slice at most."""
        if self.prefetch is None:
            return False
        return self.prefetch.step(self._read_prefetched, self.ram, lambda: self.ram.budget - self.hot_bytes,
                                  lambda: self._purges, entries, max_bytes)

    def _read_prefetched(self, batch: list[tuple[bytes, BlockRecord]]) -> list[HotBlock]:
        reads = [(key, record, self._readers.submit(self.disk.read_parsed, key.hex(), record))
                 for key, record in batch]
        return [b for b in (self._prefetched(key, record, read) for key, record, read in reads) if b is not None]

    def _prefetched(self, key: bytes, record: BlockRecord, read: Future) -> HotBlock | None:
        """A planned entry's file as a hot block, checked against its record, its key and the
        model; a damaged one is dropped (None), as a restore drops it."""
        ref = BlockRef(key, bytes.fromhex(record.parent), record.depth)
        try:
            parsed = read.result()
            # Its key checked too: no prompt's tokens vouch for it, only its record.
            check_block(parsed, key, record.kind, fingerprint=self.fingerprint, record=record,
                        parent=ref.parent if record.kind == "kv" else None, fits=self._fits_model)
            arrays = to_mlx(parsed)
        except DamagedBlock as exc:
            self._damaged(ref, exc)
            return None
        return HotBlock(key, ref.parent, ref.index, parsed.tokens.copy(), arrays, parsed.nbytes, kind=record.kind,
                        skeleton=parsed.metadata.get("skeleton"), persisted=True, prefetched=True)

    # -- lifecycle ---------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Persist every hot entry not yet on disk (retrying failed writes) and wait."""
        pending = [b for b in self.ram.unpersisted() if self.index.get(b.key) is None]
        self._submit(pending)
        done = self.writer.flush(timeout)
        if self.shared is not None:
            self.shared.flush(timeout if timeout is not None else 10.0)  # best effort: never waits long
        return done

    def close(self) -> None:
        if self.live is not None:
            self.live.clear()
        self.flush()
        self.writer.close()
        self._readers.shutdown(wait=True)
        if self.shared is not None:
            self.shared.close()
        self.disk.close()

    def stats(self) -> dict:
        queued_jobs, queued_bytes = self.writer.pending
        with self._counter_lock:
            counters = dict(self.counters)
        ram, disk = self.ram.stats(), self.disk.stats()
        # "blocks": the old name of "entries" (blocks and snapshots), kept for existing clients.
        return {
            "ram": dict(ram, entries=ram["blocks"]),
            "disk": dict(disk, blocks=disk["entries"], queued_jobs=queued_jobs, queued_bytes=queued_bytes),
            "shared": self.shared.stats() if self.shared is not None else None,
            "live": {"entries": len(self.live) if self.live is not None else 0,
                     "bytes": self.live.nbytes if self.live is not None else 0},
            "prefetch": self.prefetch.stats() if self.prefetch is not None else None,
            "block_size": self.config.block_size,
            "counters": counters,
        }


