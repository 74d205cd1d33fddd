"""The one place that moves blocks and snapshots between RAM and disk: match, restore,
store, spill, flush."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import lmdb
import numpy as np
import xxhash

from .blocks import BlockRef, encode_tokens, root_key
from .config import CacheConfig, format_size
from .disk import BlockFiles, DamagedBlock, ParsedBlock, checksum, encode_block, key_of_path, parse_block, \
    to_mlx
from .index import BlockRecord, Index, allocated_estimate, now_ms, open_or_replace
from .kvstate import BlockArrays, CachePlan, Layout, Snapshot, matches_layout, nbytes, \
    snapshot_matches
from .ram import HotBlock, RamTier
from .reindex import Rebuilder
from .space import DiskSpace, is_no_space
from .writer import DiskWriter, Entry, WriteJob

log = logging.getLogger("kvtier.tiers")

SCRATCH_PREFIX = "kvtier-ram-only-"  # + owner pid + "-": the index of a daemon without a disk tier
PROBE_SECONDS = 2.0  # while writes fail, how often the disk is tried again


def tokens_hash(tokens: Sequence[int]) -> str:
    """A second, independent hash of a block's tokens, checked before a file is read."""
    return xxhash.xxh64_hexdigest(encode_tokens(tokens), seed=0x6B76)


def _error_text(exc: Exception) -> str:
    return f"{type(exc).__name__}: {getattr(exc, 'strerror', None) or exc}"


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


@dataclass
class Hit:
    """One block of a matched prefix: hot in RAM, or just read from its file on disk."""

    ref: BlockRef
    tokens: np.ndarray
    usable: int  # its leading tokens that equal the prompt's
    nbytes: int
    hot: HotBlock | None = None  # the block in RAM
    parsed: ParsedBlock | None = None  # or its file, as numpy views over the bytes read

    @property
    def source(self) -> str:
        return "ram" if self.hot is not None else "disk"

    @property
    def arrays(self) -> dict:
        """MLX arrays when hot, numpy views of the file when read from disk."""
        return self.hot.arrays if self.hot is not None else self.parsed.tensors

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

    @property
    def num_full_blocks(self) -> int:
        return sum(1 for h in self.hits if h.usable == len(h.tokens))

    @property
    def num_tokens(self) -> int:
        return sum(self.usable)

    def add(self, hit: Hit, on_hit: Callable[[Hit], None] | None) -> None:
        self.hits.append(hit)
        if on_hit is not None:
            on_hit(hit)


@dataclass
class SnapshotHit:
    key: bytes
    position: int  # prompt tokens the snapshot covers
    snapshot: Snapshot
    source: str


@dataclass
class NewEntry:
    """A block or snapshot computed by a request, to be kept hot and written to disk."""

    ref: BlockRef
    tokens: Sequence[int]
    arrays: BlockArrays
    kind: str = "kv"
    skeleton: str | None = None


class ReadAhead:
    """Block files read on a thread pool in chain order, at most `window_bytes` ahead of the
    block being used: reads overlap the work on earlier blocks, and the bytes of files read
    but not yet used (or never used, when the chain breaks) stay bounded."""

    def __init__(self, pool: ThreadPoolExecutor, read: Callable[[str, BlockRecord], ParsedBlock],
                 planned: list[tuple[BlockRef, BlockRecord]], window_bytes: int = 256 << 20):
        self._pool, self._read, self._window = pool, read, window_bytes
        self._planned = deque(planned)
        self._started: dict[bytes, tuple[BlockRecord, Future]] = {}
        self._started_bytes = 0
        self._top_up()

    def take(self, key: bytes) -> tuple[BlockRecord, Future] | None:
        """The record and pending read of `key`'s file, if it was planned."""
        started = self._started.pop(key, None)
        if started is not None:
            self._started_bytes -= started[0].nbytes
            self._top_up()
        return started

    def cancel(self) -> None:
        for _, future in self._started.values():
            future.cancel()
        self._started.clear()
        self._planned.clear()

    def _top_up(self) -> None:
        # At least two files in flight whatever their size, so reading never stalls.
        while self._planned and (len(self._started) < 2 or self._started_bytes < self._window):
            ref, record = self._planned.popleft()
            self._started[ref.key] = (record, self._pool.submit(self._read, ref.hex, record))
            self._started_bytes += record.nbytes


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
        self._write_error: str | None = None  # last disk failure, cleared by a good write
        self._scratch: Path | None = None  # set when the cache directory cannot be used
        self._dirs_bytes = 0  # the cache directory's own and its index directory's
        self._started_at = time.time()
        self.index, self.files = self._open_disk(config.cache_dir)
        self._index_replaced = threading.Event()
        self.index.on_damage = self._index_damaged
        self._rebuilder = Rebuilder(self.index, self.files)
        if self.index.rebuild_pending():
            self.count("index_rebuilds")
            self._rebuilder.start()
        self.space = DiskSpace(self.files, config.disk_budget)
        self._retry_unpersisted = False
        self._writes_failed = False  # some blocks are in RAM only since a failed or skipped write
        # Files left behind (not indexed) that could not be removed yet: counted in the budget.
        self._strays: dict[Path, int] = {}
        self._strays_lock = threading.Lock()
        self._files_lock = threading.Lock()  # a write job, or the sweep of one subdirectory
        self.writer = DiskWriter(self._write_then_release, config.write_queue_bytes)
        # Reads files ahead of the restore loop: disk I/O overlaps decoding earlier blocks.
        self._readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kvtier-read")
        self._closing = threading.Event()
        self.swept = threading.Event()  # set once the start-up cleanup is done
        self._upkeep = threading.Thread(target=self._upkeep_loop, name="kvtier-disk-upkeep", daemon=True)
        self._upkeep.start()

    def _open_disk(self, cache_dir: Path) -> tuple[Index, BlockFiles]:
        """The cache directory's index and files; when it cannot be used (no permission, a
        read-only or full disk), an empty private index in a temporary directory, and the
        disk tier off: the daemon still serves, from RAM, and says why in its stats. A
        damaged index is replaced by an empty one, refilled from the files (`Rebuilder`)."""
        try:
            cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            _make_private(cache_dir)
            index, files = open_or_replace(cache_dir / "index"), BlockFiles(cache_dir / "blocks")
            self._dirs_bytes = sum(p.stat().st_blocks * 512 for p in (cache_dir, cache_dir / "index"))
            return index, files
        except (OSError, lmdb.Error) as exc:
            self.count("disk_write_errors")
            self._write_error = _error_text(exc)
            log.error("cache directory %s is unusable (%s): serving from RAM only, nothing is written "
                      "to disk", cache_dir, self._write_error)
            remove_stale_scratch_dirs()  # those of RAM-only daemons killed before their cleanup
            self._scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
            return Index(self._scratch / "index"), BlockFiles(self._scratch / "blocks")

    def _index_damaged(self, reason: str) -> None:
        """The index met damage at run time (in whichever thread): go on with a fresh one,
        refilled from the block files in the background; this access was a miss."""
        self.count("index_rebuilds")
        self._index_replaced.set()  # the start-up sweep stops: the new index lacks the files
        try:
            self.index.reset(reason)
        except (OSError, lmdb.Error) as exc:
            self._disk_failed(exc)
            return
        self._rebuilder.start()

    @property
    def disk_error(self) -> str | None:
        """Why the disk tier does not take every write now (it cannot write, or the disk is
        full); None when it does. Re-checked on each call, so it clears by itself."""
        if self._write_error is not None or not self.disk_enabled:
            return self._write_error
        try:
            return self.space.full_message(self.disk_used())
        except OSError as exc:  # the cache directory itself is gone
            return _error_text(exc)

    @property
    def disk_enabled(self) -> bool:
        return self.config.disk_budget > 0 and self._scratch is None

    def count(self, name: str, amount: int = 1) -> None:
        with self._counter_lock:
            self.counters[name] += amount

    # -- lookup ------------------------------------------------------------------------
    def match(self, refs: list[BlockRef], tokens: Sequence[int],
              on_hit: Callable[[Hit], None] | None = None) -> Match:
        """The longest cached prefix of `tokens`: a chain of full blocks, RAM first then disk,
        then the leading part of one more cached block that continues the chain. Blocks read
        from disk arrive as numpy views of their files (`promote` makes them hot later);
        `on_hit` sees each block once confirmed, while later files are still being read."""
        size = self.config.block_size
        tokens = np.asarray(tokens, np.uint32)
        found = Match([])
        reads = self._read_ahead(refs)
        for ref in refs:
            block_tokens = tokens[ref.index * size : (ref.index + 1) * size]
            hit = self._lookup(ref, block_tokens, reads.take(ref.key))
            if hit is None or len(hit.tokens) != size:
                break
            found.add(hit, on_hit)
        reads.cancel()  # the chain ended before these
        parent = found.hits[-1].ref.key if found.hits else root_key(self.fingerprint)
        self._match_tail(parent, len(found.hits), tokens[len(found.hits) * size :], found, on_hit)
        return found

    def mark_used(self, match: Match, snapshot: SnapshotHit | None = None) -> None:
        """Every entry a request reused is now the most recently used (done after the
        request: an index write is not worth delaying its first token for)."""
        self._touch([h.ref.key for h in match.hits] + ([snapshot.key] if snapshot else []))

    def find_snapshot(self, refs: list[BlockRef], tokens: Sequence[int], limit: int) -> SnapshotHit | None:
        """The snapshot at the largest position <= `limit` whose prefix equals the prompt's."""
        size = self.config.block_size
        tokens = np.asarray(tokens, np.uint32)
        for j in range(min(limit // size, len(refs)), -1, -1):
            anchor = refs[j - 1].key if j else root_key(self.fingerprint)
            candidates = self._children(anchor, "snap")
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

    def _children(self, parent: bytes, kind: str = "kv") -> dict[bytes, np.ndarray]:
        """Tokens of every entry of `kind` that continues `parent`, hot or on disk."""
        children = {b.key: b.tokens for b in self.ram.children(parent, kind)}
        for key, raw in self.index.children(parent, kind):
            children.setdefault(key, np.frombuffer(raw, dtype="<u4"))
        return children

    def _touch(self, keys: list[bytes]) -> None:
        if keys:
            self.ram.touch_chain(keys)
            self.note_in_index(self.index.touch, keys, now_ms())

    def _read_ahead(self, refs: list[BlockRef]) -> "ReadAhead":
        """Read the files of the chain's blocks that are on disk only, in order, up to the
        first one the index does not hold (the chain cannot go past it)."""
        cold = [ref for ref in refs if ref.key not in self.ram]
        records = self.index.get_many([ref.key for ref in cold])
        planned = []
        for ref in cold:
            if ref.key not in records:
                break
            planned.append((ref, records[ref.key]))
        return ReadAhead(self._readers, self._read_parsed, planned)

    def _read_parsed(self, key_hex: str, record: BlockRecord) -> ParsedBlock:
        return parse_block(self.files.read(key_hex, record.checksum, record.nbytes))

    def _lookup(self, ref: BlockRef, block_tokens: np.ndarray,
                pending: tuple[BlockRecord, Future] | None = None) -> Hit | None:
        """The block at `ref` if its tokens start as `block_tokens` do (all of them, or the
        leading part when it is the tail): from RAM, else read and checked from disk."""
        block = self.ram.get(ref.key)
        if block is not None:
            if block.kind != "kv" or not np.array_equal(block.tokens[: len(block_tokens)], block_tokens):
                return None
            return Hit(ref, block.tokens, len(block_tokens), block.nbytes, hot=block)
        parsed = self._read_checked(ref, block_tokens, "kv", *(pending or (None, None)))
        if parsed is None:
            return None
        return Hit(ref, parsed.tokens.copy(), len(block_tokens), parsed.nbytes, parsed=parsed)

    def _lookup_snapshot(self, ref: BlockRef, after: np.ndarray) -> tuple[HotBlock, str] | None:
        block = self.ram.get(ref.key)
        if block is not None:
            return (block, "ram") if block.kind == "snap" else None
        parsed = self._read_checked(ref, after, "snap")
        if parsed is None:
            return None
        try:
            block = HotBlock(ref.key, ref.parent, ref.index, parsed.tokens, to_mlx(parsed), parsed.nbytes,
                             kind="snap", skeleton=parsed.metadata.get("skeleton"), persisted=True)
        except DamagedBlock as exc:
            self._damaged(ref, exc)
            return None
        self._evicted(self.ram.put(block))
        return block, "disk"

    def _match_tail(self, parent: bytes, index: int, tail: np.ndarray, found: Match,
                    on_hit: Callable[[Hit], None] | None) -> None:
        """Reuse the leading tokens of a cached child block: a block's KV for its first k
        tokens depends only on the prefix, so a repeated or extended prompt reuses them."""
        if len(tail) == 0:
            return
        candidates = self._children(parent)
        best = max(candidates.items(), key=lambda kv: common_prefix(kv[1], tail), default=None)
        if best is None or common_prefix(best[1], tail) == 0:
            return
        key, block_tokens = best
        hit = self._lookup(BlockRef(key, parent, index), np.asarray(block_tokens, np.uint32))
        if hit is not None:
            hit.usable = common_prefix(hit.tokens, tail)
            found.add(hit, on_hit)

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
            parsed = read.result() if read else self._read_parsed(ref.hex, record)
            if not np.array_equal(parsed.tokens, block_tokens):
                raise DamagedBlock("stored tokens differ from the index")
            if not self._fits_model(parsed, kind):
                raise DamagedBlock("shapes, dtypes or cache classes differ from this model's")
        except DamagedBlock as exc:
            self._damaged(ref, exc)
            return None
        return parsed

    def _damaged(self, ref: BlockRef, exc: DamagedBlock) -> None:
        log.warning("cache entry %s is damaged (%s): treated as a miss and dropped", ref.hex, exc)
        self.count("damaged_blocks")
        try:
            self.drop(ref.key)
        except (OSError, lmdb.Error) as error:  # a miss all the same
            self._disk_failed(error)

    def _fits_model(self, parsed: ParsedBlock, kind: str) -> bool:
        if kind == "kv":
            shapes = {name: t.shape for name, t in parsed.tensors.items()}
            return matches_layout(shapes, parsed.dtypes, self.layout, len(parsed.tokens))
        return self.plan is not None and snapshot_matches(parsed.metadata.get("skeleton") or "", self.plan)

    def pin_prefix(self, refs: list[BlockRef], tokens: Sequence[int], pinned: bool = True) -> int:
        """Pin (or unpin) on disk every entry that holds part of `tokens`: its full blocks,
        the block continuing its tail, and the snapshots along the way."""
        size = self.config.block_size
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
        retry = []
        if self._retry_unpersisted:
            self._retry_unpersisted = False
            retry = self.ram.unpersisted()
        self._submit(blocks + retry, removed)
        for block in blocks:
            self._evicted(self.ram.put(block))

    def promote(self, entries: list[NewEntry]) -> None:
        """Blocks a request read from disk, cut back out of the cache they were restored
        into: hot from now on, and not written again (their files hold the same bits)."""
        for entry in entries:
            self._evicted(self.ram.put(HotBlock(entry.ref.key, entry.ref.parent, entry.ref.index,
                                                np.asarray(entry.tokens, np.uint32), entry.arrays,
                                                nbytes(entry.arrays), persisted=True)))

    def _covered_partials(self, block: HotBlock) -> list[bytes]:
        return [key for key, tokens in self._children(block.parent).items()
                if key != block.key and len(tokens) < len(block.tokens)
                and common_prefix(tokens, block.tokens) == len(tokens)]

    def _submit(self, blocks: list[HotBlock], removed: list[bytes] = ()) -> None:
        """Queue blocks for the disk; RAM holds them until the write is done, so a block is
        findable from the moment it is computed (the overshoot is bounded by the queue)."""
        if not self.disk_enabled:
            return
        entries = [Entry(key, None) for key in removed]  # ordered after their pending writes
        for block in blocks:
            # Parent and depth too: the index can be rebuilt from the files alone.
            meta = {"key": block.key.hex(), "fingerprint": self.fingerprint, "kind": block.kind,
                    "parent": block.parent.hex(), "depth": str(block.index)}
            if block.skeleton:
                meta["skeleton"] = block.skeleton
            entries.append(Entry(block.key, encode_block(block.arrays, block.tokens, meta), block))
        if entries:
            self.ram.hold(blocks)
            self.writer.submit(WriteJob(entries))

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
        with self._files_lock:  # the sweep must not meet this job's files before they are indexed
            try:
                for entry in job.entries:
                    if entry.payload is None:
                        self.drop(entry.key)
                writes = [e for e in job.entries if e.payload is not None and self.index.get(e.key) is None]
                indexed = self._write_within_room(writes)
            except (OSError, lmdb.Error) as exc:  # read-only, no permission, or still no space
                self._disk_failed(exc)
                return
            if indexed is None:
                return
            self._written(job, indexed)
            try:
                self._trim()  # the directories and the index grew too
            except (OSError, lmdb.Error) as exc:
                self._disk_failed(exc)

    def _written(self, job: WriteJob, indexed: list[tuple[bytes, BlockRecord, bytes]]) -> None:
        if self._write_error is not None:
            self._write_error = None
            log.info("the disk tier accepts writes again")
        if self._writes_failed:
            self._writes_failed = False
            self._retry_unpersisted = True  # the disk takes writes again: write what failed before
        self._remove_strays()
        self.count("disk_writes", len(indexed))
        self.count("disk_bytes_written", sum(r.nbytes for _, r, _ in indexed))
        for entry in job.entries:
            if entry.block is not None:
                entry.block.persisted = True

    def _write_within_room(self, writes: list[Entry]) -> list[tuple[bytes, BlockRecord, bytes]] | None:
        """Evict to make room, write the files and index them; a write the disk turns down for
        lack of space is tried once more after evicting to what the disk really holds. None
        when the entries cannot fit at all (they stay in RAM)."""
        needed = sum(allocated_estimate(len(e.payload)) for e in writes)
        self.space.note_write(needed)
        for last_try in (False, True):
            if not self._make_room(needed):
                return None
            try:
                indexed = self._write_files(writes)
                self.index.put_many(indexed)
                return indexed
            except (OSError, lmdb.Error) as exc:
                for entry in writes:  # none of them got indexed
                    self._remove_file(entry.key.hex(), raise_errors=False)
                if last_try or not is_no_space(exc):
                    raise
                self.count("disk_write_errors")
                self.space.mark_full(_error_text(exc))
        return None

    def _write_files(self, writes: list[Entry]) -> list[tuple[bytes, BlockRecord, bytes]]:
        indexed, stamp = [], now_ms()
        for entry in writes:
            block: HotBlock = entry.block
            written = self.files.write(entry.key.hex(), entry.payload)
            record = BlockRecord(
                parent=block.parent.hex(), fingerprint=self.fingerprint, depth=block.index,
                num_tokens=len(block.tokens), nbytes=written.nbytes, checksum=checksum(entry.payload),
                tokens_hash=tokens_hash(block.tokens), access_ms=stamp, created_ms=stamp,
                kind=block.kind, allocated=written.allocated)
            indexed.append((entry.key, record, encode_tokens(block.tokens)))
        return indexed

    def _disk_failed(self, exc: Exception) -> None:
        self.count("disk_write_errors")
        self._writes_failed = True
        if is_no_space(exc):
            self.space.mark_full(_error_text(exc))
            return
        if self._write_error is None:
            log.error("cannot write to %s (%s): serving from RAM only", self.files.root, exc)
        self._write_error = _error_text(exc)

    def note_in_index(self, write, *args) -> None:
        """Best-effort index bookkeeping (access times, counters): a full or read-only disk
        must not fail a request that RAM can serve."""
        try:
            write(*args)
        except lmdb.Error as exc:
            self._disk_failed(exc)

    def disk_used(self) -> int:
        """What the disk tier occupies, as the filesystem (and `du`) counts it: the blocks
        allocated for every file, the directories, the index, and leftovers not removed yet."""
        allocated = self.index.allocated()
        if allocated is None:  # an index from before this total, until its recount
            total, count = self.index.totals()
            allocated = total + count * 4096
        with self._strays_lock:
            strays = sum(self._strays.values())
        return allocated + self._dirs_bytes + self.files.dir_bytes() + self.index.disk_usage() + strays

    def _make_room(self, nbytes: int) -> bool:
        """Evict least recently used entries (any model) until `nbytes` more fit the budget,
        or what the disk can hold when that is less (the disk is then full)."""
        self._remove_strays()
        used = self.disk_used()
        capacity = self.space.capacity(used)
        if used + nbytes > capacity and capacity < self.config.disk_budget:
            self.space.mark_full(f"{format_size(nbytes)} to write, room for {format_size(max(capacity, 0))} of cache")
        evictable = self.index.allocated() or 0
        if used - evictable + nbytes <= capacity and self._evict_while(lambda: self.disk_used() + nbytes > capacity):
            return True
        # Not even an empty cache would hold it: nothing is evicted in vain.
        self._skipped(nbytes, disk_full=capacity < self.config.disk_budget)
        return False

    def _trim(self) -> None:
        capacity = self.space.capacity(self.disk_used())
        self._evict_while(lambda: self.disk_used() > capacity)

    def _evict_while(self, too_big: Callable[[], bool]) -> bool:
        """Evict the least recently used entry while `too_big`; False if none is left."""
        while too_big():
            victims = self.index.oldest(1)  # one at a time: evict no more than needed
            if not victims:
                return False
            self.drop(victims[0])
            self.files.prune_dir(victims[0].hex())
            self.count("disk_evictions")
        return True

    def _skipped(self, nbytes: int, disk_full: bool) -> None:
        if disk_full:  # written once the disk has room again
            self._writes_failed = True
            self.count("disk_writes_skipped_full")
        else:  # larger than the whole budget: stays in RAM
            self.count("disk_writes_skipped_budget")
        log.warning("%s for %d bytes of cache entries: kept in RAM only",
                    "disk full" if disk_full else "disk budget too small", nbytes)

    def drop(self, key: bytes) -> None:
        """Remove an entry from disk: index entry first, then the file."""
        self.index.remove(key)
        self._remove_file(key.hex())

    def _remove_file(self, key_hex: str, raise_errors: bool = True) -> None:
        """A file that cannot be removed (a read-only disk) stays counted until it can be."""
        try:
            self.files.remove(key_hex)
        except OSError:
            self._note_stray(self.files.path_for(key_hex))
            if raise_errors:
                raise

    def _note_stray(self, path: Path) -> None:
        try:
            size = path.lstat().st_blocks * 512
        except OSError:
            return
        with self._strays_lock:
            self._strays[path] = size

    def _remove_strays(self) -> None:
        with self._strays_lock:
            strays = list(self._strays)
        for path in strays:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                continue
            with self._strays_lock:
                self._strays.pop(path, None)

    # -- upkeep (its own thread) ---------------------------------------------------------
    def _upkeep_loop(self) -> None:
        """After start-up: recount an old index's allocated total, sweep what a killed daemon
        left behind; then, while writes fail, try the disk again so the error clears by itself."""
        try:
            if self.disk_enabled:
                if self.index.allocated() is None:
                    self.note_in_index(self.index.recount)
                self._rebuilder.wait()  # files a rebuild has not reached yet are not leftovers
                self.sweep_leftovers()
            remove_stale_scratch_dirs()
        except Exception:  # upkeep must never take the daemon down
            log.exception("start-up cleanup of %s failed", self.files.root)
        self.swept.set()
        while not self._closing.wait(PROBE_SECONDS):
            if self._write_error is not None and self.disk_enabled:
                self._probe_disk()

    def sweep_leftovers(self) -> int:
        """Remove temp files and unindexed block files older than this process: a killed
        daemon's (only one daemon owns a cache directory). One listing per subdirectory and
        the index's keys, no file is opened; our own writer's files are safe, as a
        subdirectory is swept only between its jobs. Returns the files removed."""
        removed = 0
        for subdir in self.files.subdirs():
            if self._closing.is_set():
                break
            with self._files_lock:
                removed += self._sweep(subdir)
        if removed:
            log.info("removed %d files left behind in %s", removed, self.files.root)
        return removed

    def _sweep(self, subdir: Path) -> int:
        try:
            with os.scandir(subdir) as listing:
                files = [entry for entry in listing if entry.is_file(follow_symlinks=False)]
        except OSError:
            return 0
        keys = {entry.name: _key_bytes(entry.name) for entry in files}
        indexed = self.index.has_many([k for k in keys.values() if k is not None])
        if self._rebuilder.running or self._index_replaced.is_set():
            return 0  # an index being refilled does not list every file yet
        removed = 0
        for entry in files:
            if keys[entry.name] in indexed:
                continue
            path = Path(entry.path)
            try:
                if path.lstat().st_mtime >= self._started_at:
                    continue  # not a leftover: someone is writing it now
                path.unlink()
                removed += 1
            except FileNotFoundError:
                continue
            except OSError:
                self._note_stray(path)
        return removed

    def _probe_disk(self) -> None:
        try:
            self.files.probe()
            self.index.add_counters(self.fingerprint, {})  # an index write, changing nothing
        except (OSError, lmdb.Error) as exc:
            if not is_no_space(exc):
                self._write_error = _error_text(exc)
                return
            self.space.mark_full(_error_text(exc))  # writable again, but full: reported as such
        log.info("the disk tier accepts writes again")
        self._write_error = None
        self._retry_unpersisted = True

    def spill(self, target_bytes: int) -> int:
        """Shrink the hot tier to `target_bytes` (memory pressure). Entries not yet on disk
        are queued for it and stay until written (then RAM evicts down to its budget; the
        next spill goes further). Returns the bytes released now."""
        self._submit(self.ram.unpersisted())
        victims = self.ram.shrink_to(target_bytes)
        self._evicted(victims)
        released = sum(b.nbytes for b in victims)
        self.count("ram_bytes_spilled", released)
        return released

    # -- lifecycle ---------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Persist every hot entry not yet on disk (retrying failed writes) and wait."""
        pending = [b for b in self.ram.unpersisted() if self.index.get(b.key) is None]
        self._submit(pending)
        return self.writer.flush(timeout)

    def close(self) -> None:
        self.flush()
        self.writer.close()
        self._closing.set()  # before the rebuild stops: the sweep must not follow a partial one
        self._rebuilder.stop()
        self._upkeep.join()
        self._readers.shutdown(wait=True)
        self.index.close()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def stats(self) -> dict:
        disk_bytes, disk_blocks = self.index.totals()
        error = self.disk_error
        queued_jobs, queued_bytes = self.writer.pending
        with self._counter_lock:
            counters = dict(self.counters)
        return {
            "ram": self.ram.usage(),
            "disk": {"blocks": disk_blocks, "bytes": disk_bytes,
                     "index_bytes": self.index.disk_usage(), "used_bytes": self.disk_used(),
                     "budget": self.config.disk_budget, "writable": error is None, "error": error,
                     "full": self.space.is_full, "index_rebuilding": self._rebuilder.running,
                     "queued_jobs": queued_jobs, "queued_bytes": queued_bytes},
            "block_size": self.config.block_size,
            "counters": counters,
        }


def _key_bytes(name: str) -> bytes | None:
    key = key_of_path(Path(name))
    try:
        return bytes.fromhex(key) if key is not None else None
    except ValueError:
        return None


def _make_private(cache_dir: Path) -> None:
    """The cache holds prompts' KV: only its owner may read it. A kvtier directory open to
    others (made by hand, or by an older version) is tightened to 0700; a directory that
    holds anything else is refused rather than changed."""
    for path in (cache_dir, cache_dir / "index", cache_dir / "blocks"):
        if not path.is_dir() or path.stat().st_mode & 0o077 == 0:
            continue
        if path == cache_dir and (foreign := set(os.listdir(cache_dir)) - {"index", "blocks"}):
            raise PermissionError(
                f"{cache_dir} is open to other users (mode {path.stat().st_mode & 0o777:o}) and holds "
                f"other files ({', '.join(sorted(foreign)[:3])}): not used for the cache; choose a "
                f"private directory, or chmod 700 it")
        log.warning("%s was open to other users (mode %o): now 0700", path, path.stat().st_mode & 0o777)
        os.chmod(path, 0o700)


def remove_stale_scratch_dirs() -> None:
    """Remove RAM-only scratch directories whose daemon is gone (killed before its cleanup)."""
    pattern = re.compile(re.escape(SCRATCH_PREFIX) + r"(\d+)-")
    root = Path(tempfile.gettempdir())
    try:
        entries = list(root.iterdir())
    except OSError:
        return
    for path in entries:
        match = pattern.match(path.name)
        if not match or int(match.group(1)) == os.getpid() or _process_alive(int(match.group(1))):
            continue
        try:
            if path.lstat().st_uid == os.getuid() and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
