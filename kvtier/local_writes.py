"""The local disk tier's writes: a job's files written and indexed within the budget, the
least recently used evicted to make room, and what a failed or skipped write leaves (the
error the tier reports, the retry once the disk takes writes again, files that could not be
removed yet). Part of local.LocalDisk, which owns the index, the files and the budget."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable, Protocol

import lmdb

from .blocks import encode_tokens, tokens_hash
from .config import format_size
from .disk import BlockFiles, checksum
from .index import BlockRecord, Index, allocated_estimate, now_ms
from .ram import HotBlock
from .space import DiskSpace, is_no_space
from .tier import Count
from .writer import Entry, WriteJob

log = logging.getLogger("kvtier.local")

EVICT_BATCH = 1000  # entries removed in one index transaction
Indexed = list[tuple[bytes, BlockRecord, bytes]]


def error_text(exc: Exception) -> str:
    return f"{type(exc).__name__}: {getattr(exc, 'strerror', None) or exc}"


class Strays:
    """Files left behind (not indexed) that could not be removed yet (a read-only disk):
    counted in the budget until they are."""

    def __init__(self) -> None:
        self._sizes: dict[Path, int] = {}
        self._lock = threading.Lock()

    def note(self, path: Path) -> None:
        try:
            size = path.lstat().st_blocks * 512
        except OSError:
            return
        with self._lock:
            self._sizes[path] = size

    def remove(self) -> None:
        """Try each again."""
        with self._lock:
            strays = list(self._sizes)
        for path in strays:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                continue
            with self._lock:
                self._sizes.pop(path, None)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values())


class Disk(Protocol):
    """What the writes need of the disk tier (local.LocalDisk)."""

    index: Index
    files: BlockFiles
    space: DiskSpace
    budget: int
    count: Count

    def disk_used(self) -> int: ...

    def drop(self, key: bytes) -> None: ...


class DiskWrites:
    """Writes into `disk`'s files and index, and their failures."""

    def __init__(self, disk: Disk, error: str | None = None):
        self.disk = disk
        self.error = error  # last disk failure, cleared by a good write
        self.retry_due = False  # the disk takes writes again: what failed before is to be rewritten
        self.failed_some = False  # some blocks are in RAM only since a failed or skipped write
        self.strays = Strays()
        self.files_lock = threading.Lock()  # a write job, or the sweep of one subdirectory

    def write_job(self, job: WriteJob, count: Count | None = None) -> Indexed | None:
        """Run a write job: its removals, then its new files, indexed together within the
        budget, each record naming the job's model. Returns what got indexed (None: nothing,
        the error is recorded). Its writes are counted by `count` (its store's), else the disk's."""
        disk = self.disk
        with self.files_lock:  # the sweep must not meet this job's files before they are indexed
            try:
                for entry in job.entries:
                    if entry.payload is None:
                        disk.drop(entry.key)
                writes = [e for e in job.entries if e.payload is not None and disk.index.get(e.key) is None]
                indexed = self._write_within_room(writes, job.fingerprint)
            except (OSError, lmdb.Error) as exc:  # read-only, no permission, or still no space
                self.failed(exc)
                return None
            if indexed is None:
                return None
            self._written(indexed, count or disk.count)
            try:
                self._trim()  # the directories and the index grew too
            except (OSError, lmdb.Error) as exc:
                self.failed(exc)
            return indexed

    def _written(self, indexed: Indexed, count: Count) -> None:
        if self.error is not None:
            self.error = None
            log.info("the disk tier accepts writes again")
        if self.failed_some:
            self.failed_some = False
            self.retry_due = True  # the disk takes writes again: write what failed before
        self.strays.remove()
        count("disk_writes", len(indexed))
        count("disk_bytes_written", sum(r.nbytes for _, r, _ in indexed))

    def _write_within_room(self, writes: list[Entry], fingerprint: str) -> Indexed | None:
        """Evict to make room, write the files and index them; a write the disk turns down for
        lack of space is tried once more after evicting to what the disk really holds. None
        when the entries cannot fit at all (they stay in RAM)."""
        needed = sum(allocated_estimate(len(e.payload)) for e in writes if e.payload is not None)
        self.disk.space.note_write(needed)
        for last_try in (False, True):
            if not self._make_room(needed):
                return None
            try:
                indexed = self._write_files(writes, fingerprint)
                self.disk.index.put_many(indexed)
                return indexed
            except (OSError, lmdb.Error) as exc:
                for entry in writes:  # none of them got indexed
                    self.remove_file(entry.key.hex(), raise_errors=False)
                if last_try or not is_no_space(exc):
                    raise
                self.disk.count("disk_write_errors")
                self.disk.space.mark_full(error_text(exc))
        return None

    def _write_files(self, writes: list[Entry], fingerprint: str) -> Indexed:
        indexed, stamp = [], now_ms()
        for entry in writes:
            block: HotBlock = entry.block
            payload = entry.payload
            assert payload is not None  # removals are not among the writes
            written = self.disk.files.write(entry.key.hex(), payload)
            record = BlockRecord(
                parent=block.parent.hex(), fingerprint=fingerprint, depth=block.index,
                num_tokens=len(block.tokens), nbytes=written.nbytes, checksum=checksum(payload),
                tokens_hash=tokens_hash(block.tokens), access_ms=stamp, created_ms=stamp,
                kind=block.kind, allocated=written.allocated)
            indexed.append((entry.key, record, encode_tokens(block.tokens)))
        return indexed

    def failed(self, exc: Exception) -> None:
        """A write (or index bookkeeping) failed: counted; a full disk is reported as such,
        anything else as the tier's error (RAM only until a write succeeds)."""
        self.disk.count("disk_write_errors")
        self.failed_some = True
        if is_no_space(exc):
            self.disk.space.mark_full(error_text(exc))
            return
        if self.error is None:
            log.error("cannot write to %s (%s): serving from RAM only", self.disk.files.root, exc)
        self.error = error_text(exc)

    def take_retry(self) -> bool:
        """True once after the disk took writes again: rewrite what failed before."""
        due, self.retry_due = self.retry_due, False
        return due

    # -- room: eviction within the budget and what the disk holds ------------------------
    def _make_room(self, nbytes: int) -> bool:
        """Evict least recently used entries (any model) until `nbytes` more fit the budget,
        or what the disk can hold when that is less (the disk is then full)."""
        disk = self.disk
        self.strays.remove()
        used = disk.disk_used()
        capacity = disk.space.capacity(used)
        if used + nbytes > capacity and capacity < disk.budget:
            disk.space.mark_full(f"{format_size(nbytes)} to write, room for {format_size(max(capacity, 0))} of cache")
        evictable = disk.index.allocated()
        if used - evictable + nbytes <= capacity and self.evict_while(lambda: disk.disk_used() + nbytes - capacity):
            return True
        # Not even an empty cache would hold it: nothing is evicted in vain.
        self._skipped(nbytes, disk_full=capacity < disk.budget)
        return False

    def _trim(self) -> None:
        capacity = self.disk.space.capacity(self.disk.disk_used())
        self.evict_while(lambda: self.disk.disk_used() - capacity)

    def evict_while(self, excess: Callable[[], int], prune: bool = True) -> bool:
        """Evict least recently used entries while `excess()` bytes are over; False if none
        is left. Each round takes just enough of the oldest to cover the excess by their
        allocated bytes (what eviction frees), removed in one index transaction: the same
        entries as one at a time, at a constant cost per entry. `prune` removes emptied
        subdirectories: only the daemon's writer may (it recreates what it needs), not the
        CLI beside a running daemon."""
        while (over := excess()) > 0:
            victims = self.disk.index.oldest(EVICT_BATCH, covering=over)
            if not victims:
                return False
            self.remove_many(victims)
            if prune:
                for key in victims:
                    self.disk.files.prune_dir(key.hex())
            self.disk.count("disk_evictions", len(victims))
        return True

    def _skipped(self, nbytes: int, disk_full: bool) -> None:
        if disk_full:  # written once the disk has room again
            self.failed_some = True
            self.disk.count("disk_writes_skipped_full")
        else:  # larger than the whole budget: stays in RAM
            self.disk.count("disk_writes_skipped_budget")
        log.warning("%s for %d bytes of cache entries: kept in RAM only",
                    "disk full" if disk_full else "disk budget too small", nbytes)

    # -- removal -------------------------------------------------------------------------
    def remove_many(self, keys: list[bytes]) -> int:
        """Remove entries (index first, then the files), EVICT_BATCH to a transaction;
        returns those the index held. A file that cannot be removed stays counted (a stray)
        and the first such error is raised once every other file is removed."""
        removed, failed = 0, None
        for start in range(0, len(keys), EVICT_BATCH):
            # In key order: files of one subdirectory, and records of one index page, go
            # together (a fraction of the cost of the LRU order's scattered keys).
            batch = sorted(keys[start : start + EVICT_BATCH])
            removed += len(self.disk.index.remove_many(batch))
            for key in batch:
                try:
                    self.remove_file(key.hex())
                except OSError as exc:
                    failed = failed or exc
        if failed is not None:
            raise failed
        return removed

    def remove_file(self, key_hex: str, raise_errors: bool = True) -> None:
        """A file that cannot be removed (a read-only disk) stays counted until it can be."""
        try:
            self.disk.files.remove(key_hex)
        except OSError:
            self.strays.note(self.disk.files.path_for(key_hex))
            if raise_errors:
                raise
