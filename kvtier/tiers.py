"""The one place that moves blocks and snapshots between RAM and disk: match, restore,
store, spill, flush."""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import lmdb
import numpy as np
import xxhash

from .blocks import BlockRef, encode_tokens, root_key
from .config import CacheConfig
from .disk import BlockFiles, DamagedBlock, ParsedBlock, checksum, encode_block, parse_block, to_mlx
from .index import BlockRecord, Index, now_ms, open_or_replace
from .kvstate import BlockArrays, CachePlan, Layout, Snapshot, matches_layout, nbytes, \
    snapshot_matches
from .ram import HotBlock, RamTier
from .reindex import Rebuilder
from .writer import DiskWriter, Entry, WriteJob

log = logging.getLogger("kvtier.tiers")


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
        self.disk_error: str | None = None  # last disk failure, cleared by a good write
        self._scratch: Path | None = None  # set when the cache directory cannot be used
        self.index, self.files = self._open_disk(config.cache_dir)
        self.index.on_damage = self._index_damaged
        self._rebuilder = Rebuilder(self.index, self.files)
        if self.index.rebuild_pending():
            self.count("index_rebuilds")
            self._rebuilder.start()
        self._retry_unpersisted = False
        self.writer = DiskWriter(self._write_then_release, config.write_queue_bytes)
        # Reads files ahead of the restore loop: disk I/O overlaps decoding earlier blocks.
        self._readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kvtier-read")

    def _open_disk(self, cache_dir: Path) -> tuple[Index, BlockFiles]:
        """The cache directory's index and files; when it cannot be used (no permission, a
        read-only or full disk), an empty private index in a temporary directory, and the
        disk tier off: the daemon still serves, from RAM, and says why in its stats. A
        damaged index is replaced by an empty one, refilled from the files (`Rebuilder`)."""
        try:
            cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            return open_or_replace(cache_dir / "index"), BlockFiles(cache_dir / "blocks")
        except (OSError, lmdb.Error) as exc:
            self.count("disk_write_errors")
            self.disk_error = _error_text(exc)
            log.error("cache directory %s is unusable (%s): serving from RAM only, nothing is written "
                      "to disk", cache_dir, self.disk_error)
            self._scratch = Path(tempfile.mkdtemp(prefix="kvtier-ram-only-"))
            return Index(self._scratch / "index"), BlockFiles(self._scratch / "blocks")

    def _index_damaged(self, reason: str) -> None:
        """The index met damage at run time (in whichever thread): go on with a fresh one,
        refilled from the block files in the background; this access was a miss."""
        self.count("index_rebuilds")
        try:
            self.index.reset(reason)
        except (OSError, lmdb.Error) as exc:
            self._disk_failed(exc)
            return
        self._rebuilder.start()

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
        self.drop(ref.key)

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
        writes: list[Entry] = []
        try:
            for entry in job.entries:
                if entry.payload is None:
                    self.drop(entry.key)
            writes = [e for e in job.entries if e.payload is not None and self.index.get(e.key) is None]
            if not self._make_room(sum(len(e.payload) for e in writes)):
                self.count("disk_writes_skipped_budget")
                log.warning("disk budget too small for %d cache entries: kept in RAM only", len(writes))
                return
            indexed = self._write_files(writes)
            self.index.put_many(indexed)
            self._make_room(0)  # the index file grew with them: back under the budget
        except (OSError, lmdb.Error) as exc:  # disk full, read-only, or the index cannot grow
            for entry in writes:  # none of them got indexed
                self.files.remove(entry.key.hex())
            self._disk_failed(exc)
            return
        if self.disk_error is not None:
            self.disk_error = None
            self._retry_unpersisted = True  # space is back: write what failed before
            log.info("the disk tier accepts writes again")
        self.count("disk_writes", len(writes))
        self.count("disk_bytes_written", sum(r.nbytes for _, r, _ in indexed))
        for entry in job.entries:
            if entry.block is not None:
                entry.block.persisted = True

    def _write_files(self, writes: list[Entry]) -> list[tuple[bytes, BlockRecord, bytes]]:
        indexed, stamp = [], now_ms()
        for entry in writes:
            block: HotBlock = entry.block
            size = self.files.write(entry.key.hex(), entry.payload)
            record = BlockRecord(
                parent=block.parent.hex(), fingerprint=self.fingerprint, depth=block.index,
                num_tokens=len(block.tokens), nbytes=size, checksum=checksum(entry.payload),
                tokens_hash=tokens_hash(block.tokens), access_ms=stamp, created_ms=stamp,
                kind=block.kind)
            indexed.append((entry.key, record, encode_tokens(block.tokens)))
        return indexed

    def _disk_failed(self, exc: Exception) -> None:
        self.count("disk_write_errors")
        if self.disk_error is None:
            log.error("cannot write to %s (%s): serving from RAM only", self.files.root, exc)
        self.disk_error = _error_text(exc)

    def note_in_index(self, write, *args) -> None:
        """Best-effort index bookkeeping (access times, counters): a full or read-only disk
        must not fail a request that RAM can serve."""
        try:
            write(*args)
        except lmdb.Error as exc:
            self._disk_failed(exc)

    def disk_used(self) -> int:
        return self.index.totals()[0] + self.index.disk_usage()

    def _make_room(self, nbytes: int) -> bool:
        """Evict least recently used entries (any model) until `nbytes` more fit the budget."""
        while self.disk_used() + nbytes > self.config.disk_budget:
            victims = self.index.oldest(1)  # one at a time: evict no more than needed
            if not victims:
                return False
            for key in victims:
                self.drop(key)
                self.count("disk_evictions")
        return True

    def drop(self, key: bytes) -> None:
        """Remove an entry from disk: index entry first, then the file."""
        self.index.remove(key)
        self.files.remove(key.hex())

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
        self._readers.shutdown(wait=True)
        self._rebuilder.stop()
        self.index.close()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def stats(self) -> dict:
        disk_bytes, disk_blocks = self.index.totals()
        queued_jobs, queued_bytes = self.writer.pending
        with self._counter_lock:
            counters = dict(self.counters)
        return {
            "ram": self.ram.usage(),
            "disk": {"blocks": disk_blocks, "bytes": disk_bytes,
                     "index_bytes": self.index.disk_usage(), "budget": self.config.disk_budget,
                     "writable": self.disk_error is None, "error": self.disk_error,
                     "index_rebuilding": self._rebuilder.running,
                     "queued_jobs": queued_jobs, "queued_bytes": queued_bytes},
            "block_size": self.config.block_size,
            "counters": counters,
        }
