"""The local SSD tier: an LMDB index of block files under a byte budget, written crash-safely,
evicted least recently used first, checked on every read, swept of what a killed daemon left.

One class for the daemon (`LocalDisk.open`: creates the directory, falls back to a private
scratch directory when it cannot be used, rebuilds a damaged index, runs the upkeep thread)
and the CLI (`LocalDisk.existing`: an existing directory, no threads; a damaged index raises
IndexDamaged, which the CLI's handle, ops.CacheDir, reports and repairs).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import lmdb
import numpy as np

from .blocks import encode_tokens, tokens_hash
from .checks import check_block
from .config import format_size
from .disk import (
    BlockFiles,
    DamagedBlock,
    ParsedBlock,
    allocated_bytes,
    checksum,
    parse_block,
    to_mlx,
)
from .index import BlockRecord, Index, allocated_estimate, now_ms, open_or_replace
from .leftovers import in_subdir
from .ram import HotBlock
from .reindex import Rebuilder
from .space import DiskSpace, is_no_space
from .tier import Count
from .writer import Entry, WriteJob

log = logging.getLogger("kvtier.local")

SCRATCH_PREFIX = "kvtier-ram-only-"  # + owner pid + "-": the index of a daemon without a disk tier
PROBE_SECONDS = 2.0  # while writes fail, how often the disk is tried again
EVICT_BATCH = 1000  # entries removed in one index transaction


def _error_text(exc: Exception) -> str:
    return f"{type(exc).__name__}: {getattr(exc, 'strerror', None) or exc}"


def _no_count(name: str, amount: int = 1) -> None:
    """The CLI keeps no counters."""


class LocalDisk:
    """The local SSD tier (tier.Tier): entries are BlockRecords, read as ParsedBlocks."""

    name = "disk"

    def __init__(self, path: Path, index: Index, files: BlockFiles, budget: int,
                 count: Count = _no_count, fingerprint: str = "",
                 scratch: Path | None = None, write_error: str | None = None, dirs_bytes: int = 0,
                 owns_index: bool = True):
        self.path, self.files, self.budget = Path(path), files, budget
        self.index = index
        self.count, self.fingerprint = count, fingerprint
        self._owns_index = owns_index
        self.scratch = scratch  # set when the cache directory cannot be used
        self._write_error = write_error  # last disk failure, cleared by a good write
        self._dirs_bytes = dirs_bytes  # the cache directory's own and its index directory's
        self._started_at = time.time()
        self._index_replaced = threading.Event()
        self.space = DiskSpace(files, budget)
        self.retry_due = False  # the disk takes writes again: what failed before is to be rewritten
        self._writes_failed = False  # some blocks are in RAM only since a failed or skipped write
        # Files left behind (not indexed) that could not be removed yet: counted in the budget.
        self._strays: dict[Path, int] = {}
        self._strays_lock = threading.Lock()
        self._files_lock = threading.Lock()  # a write job, or the sweep of one subdirectory
        self._closing = threading.Event()
        self.swept = threading.Event()  # set once the start-up cleanup is done
        self.rebuilder = Rebuilder(index, files)
        self._upkeep: threading.Thread | None = None

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, cache_dir: Path, budget: int, count: Count,
             fingerprint: str) -> "LocalDisk":
        """The daemon's disk tier: the cache directory's index and files; when it cannot be
        used (no permission, a read-only or full disk), an empty private index in a temporary
        directory, and the tier off: the daemon still serves, from RAM, and says why in its
        stats. A damaged index is replaced by an empty one, refilled from the files."""
        try:
            cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            _make_private(cache_dir)
            index, files = open_or_replace(cache_dir / "index"), BlockFiles(cache_dir / "blocks")
            dirs_bytes = sum(p.stat().st_blocks * 512 for p in (cache_dir, cache_dir / "index"))
            disk = cls(cache_dir, index, files, budget, count, fingerprint, dirs_bytes=dirs_bytes)
        except (OSError, lmdb.Error) as exc:
            count("disk_write_errors", 1)
            error = _error_text(exc)
            log.error("cache directory %s is unusable (%s): serving from RAM only, nothing is written "
                      "to disk", cache_dir, error)
            remove_stale_scratch_dirs()  # those of RAM-only daemons killed before their cleanup
            scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
            disk = cls(cache_dir, Index(scratch / "index"), BlockFiles(scratch / "blocks"), budget, count,
                       fingerprint, scratch=scratch, write_error=error)
        disk.index.on_damage = disk._index_damaged
        if disk.index.rebuild_pending():
            disk.count("index_rebuilds", 1)
            disk.rebuilder.start()
        disk._upkeep = threading.Thread(target=disk._upkeep_loop, name="kvtier-disk-upkeep", daemon=True)
        disk._upkeep.start()
        return disk

    @classmethod
    def existing(cls, path: Path, index: Index | None = None, files: BlockFiles | None = None,
                 walk: bool = False) -> "LocalDisk":
        """An existing cache directory, for the CLI (daemon running or not: LMDB is
        multi-process safe; the daemon passes its own open index, as LMDB allows one open
        environment per file in a process). An index that fails its checks (`walk`: the
        full one) raises IndexDamaged."""
        path = Path(path).expanduser()
        if index is None and not (path / "index").exists():
            raise FileNotFoundError(f"no kvtier cache at {path}")
        owns = index is None
        if index is None:
            index = Index(path / "index", walk=walk)
        # The directories' own blocks count as the daemon counts them (`open`): du counts them too.
        dirs_bytes = sum(allocated_bytes(p) for p in (path, path / "index"))
        return cls(path, index, files or BlockFiles(path / "blocks"), budget=0, owns_index=owns,
                   dirs_bytes=dirs_bytes)

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
        self.rebuilder.start()

    @property
    def disk_error(self) -> str | None:
        """Why the disk tier does not take every write now (it cannot write, or the disk is
        full); None when it does. Re-checked on each call, so it clears by itself."""
        if self._write_error is not None or not self.disk_enabled:
            return self._write_error
        if self._vanished():
            return f"{self.path} or its index was deleted: it is made again within {PROBE_SECONDS:.0f} s"
        try:
            return self.space.full_message(self.disk_used())
        except OSError as exc:  # the cache directory itself is gone
            return _error_text(exc)

    @property
    def disk_enabled(self) -> bool:
        return self.budget > 0 and self.scratch is None

    def read_parsed(self, key_hex: str, record: BlockRecord) -> ParsedBlock:
        return parse_block(self.files.read(key_hex, record.checksum, record.nbytes))

    def read_into(self, key_hex: str, record: BlockRecord, targets: dict[str, np.ndarray]) -> ParsedBlock:
        """The file read straight into `targets` (BlockFiles.read_into), checked as `read_parsed` checks it."""
        return self.files.read_into(key_hex, record.checksum, record.nbytes, targets)

    def write_job(self, job: WriteJob) -> list[tuple[bytes, BlockRecord, bytes]] | None:
        """Run a write job: its removals, then its new files, indexed together within the
        budget. Returns what got indexed (None: nothing, the error is recorded)."""
        with self._files_lock:  # the sweep must not meet this job's files before they are indexed
            try:
                for entry in job.entries:
                    if entry.payload is None:
                        self.drop(entry.key)
                writes = [e for e in job.entries if e.payload is not None and self.index.get(e.key) is None]
                indexed = self._write_within_room(writes)
            except (OSError, lmdb.Error) as exc:  # read-only, no permission, or still no space
                self._disk_failed(exc)
                return None
            if indexed is None:
                return None
            self._written(indexed)
            try:
                self._trim()  # the directories and the index grew too
            except (OSError, lmdb.Error) as exc:
                self._disk_failed(exc)
            return indexed

    def _written(self, indexed: list[tuple[bytes, BlockRecord, bytes]]) -> None:
        if self._write_error is not None:
            self._write_error = None
            log.info("the disk tier accepts writes again")
        if self._writes_failed:
            self._writes_failed = False
            self.retry_due = True  # the disk takes writes again: write what failed before
        self._remove_strays()
        self.count("disk_writes", len(indexed))
        self.count("disk_bytes_written", sum(r.nbytes for _, r, _ in indexed))

    def _write_within_room(self, writes: list[Entry]) -> list[tuple[bytes, BlockRecord, bytes]] | None:
        """Evict to make room, write the files and index them; a write the disk turns down for
        lack of space is tried once more after evicting to what the disk really holds. None
        when the entries cannot fit at all (they stay in RAM)."""
        needed = sum(allocated_estimate(len(e.payload)) for e in writes if e.payload is not None)
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
            payload = entry.payload
            assert payload is not None  # removals are not among the writes
            written = self.files.write(entry.key.hex(), payload)
            record = BlockRecord(
                parent=block.parent.hex(), fingerprint=self.fingerprint, depth=block.index,
                num_tokens=len(block.tokens), nbytes=written.nbytes, checksum=checksum(payload),
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
        with self._strays_lock:
            strays = sum(self._strays.values())
        return self.index.allocated() + self._dirs_bytes + self.files.dir_bytes() + self.index.disk_usage() + strays

    def _make_room(self, nbytes: int) -> bool:
        """Evict least recently used entries (any model) until `nbytes` more fit the budget,
        or what the disk can hold when that is less (the disk is then full)."""
        self._remove_strays()
        used = self.disk_used()
        capacity = self.space.capacity(used)
        if used + nbytes > capacity and capacity < self.budget:
            self.space.mark_full(f"{format_size(nbytes)} to write, room for {format_size(max(capacity, 0))} of cache")
        evictable = self.index.allocated()
        if used - evictable + nbytes <= capacity and self._evict_while(lambda: self.disk_used() + nbytes - capacity):
            return True
        # Not even an empty cache would hold it: nothing is evicted in vain.
        self._skipped(nbytes, disk_full=capacity < self.budget)
        return False

    def _trim(self) -> None:
        capacity = self.space.capacity(self.disk_used())
        self._evict_while(lambda: self.disk_used() - capacity)

    def _evict_while(self, excess: Callable[[], int], prune: bool = True) -> bool:
        """Evict least recently used entries while `excess()` bytes are over; False if none
        is left. Each round takes just enough of the oldest to cover the excess by their
        allocated bytes (what eviction frees), removed in one index transaction: the same
        entries as one at a time, at a constant cost per entry. `prune` removes emptied
        subdirectories: only the daemon's writer may (it recreates what it needs), not the
        CLI beside a running daemon."""
        while (over := excess()) > 0:
            victims = self.index.oldest(EVICT_BATCH, covering=over)
            if not victims:
                return False
            self.remove_many(victims)
            if prune:
                for key in victims:
                    self.files.prune_dir(key.hex())
            self.count("disk_evictions", len(victims))
        return True

    def evict_to(self, target: int) -> int:
        """Evict least recently used entries until the tier takes at most `target` bytes,
        counted as the budget counts them (`kvtier purge --to-size`); returns the entries removed."""
        before = self.index.totals()[1]
        self._evict_while(lambda: self.disk_used() - target, prune=False)
        return before - self.index.totals()[1]

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
        """After start-up: sweep what a killed daemon left behind; then, while writes fail,
        try the disk again so the error clears by itself."""
        try:
            if self.disk_enabled:
                self.rebuilder.wait()  # files a rebuild has not reached yet are not leftovers
                self.sweep_leftovers()
            remove_stale_scratch_dirs()
        except Exception:  # upkeep must never take the daemon down
            log.exception("start-up cleanup of %s failed", self.files.root)
        self.swept.set()
        while not self._closing.wait(PROBE_SECONDS):
            if self._vanished():
                self._remake()
            if self._write_error is not None and self.disk_enabled:
                self._probe_disk()

    def _vanished(self) -> bool:
        """Whether the cache directory, or its index, was deleted under the daemon (LMDB
        would go on writing to the deleted file: lost at the next start)."""
        return self.disk_enabled and self._owns_index and not (self.path / "index" / "data.mdb").exists()

    def _remake(self) -> None:
        """Make the deleted directory and index again, the index refilled from what block
        files are left (none if the whole directory went); blocks are written there from now
        on. What only the deleted files held is gone: those prompts are computed again."""
        log.warning("%s or its index was deleted under the daemon: made again", self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:  # its parent is read-only now, say: RAM only until the probe succeeds
            self._disk_failed(exc)
            return
        self._index_damaged(f"{self.path / 'index'} was deleted")
        self._dirs_bytes = sum(allocated_bytes(p) for p in (self.path, self.path / "index"))

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
        found = in_subdir(subdir, self.index)
        if self.rebuilder.running or self._index_replaced.is_set():
            return 0  # an index being refilled does not list every file yet
        removed = 0
        for stray in found:
            # Foreign files are reported by `kvtier verify`, never removed; a file newer than
            # this process is not a leftover: someone is writing it now.
            if stray.kind not in ("temp_file", "orphan_file") or stray.mtime >= self._started_at:
                continue
            try:
                stray.path.unlink()
                removed += 1
            except FileNotFoundError:
                continue
            except OSError:
                self._note_stray(stray.path)
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
        self.retry_due = True

    # -- the interface (tier.Tier) and what the CLI needs -------------------------------------
    def lookup(self, keys: list[bytes]) -> dict[bytes, int]:
        return {k: r.nbytes for k, r in self.index.get_many(keys).items()}

    def get(self, key: bytes) -> BlockRecord | None:
        return self.index.get(key)

    def put(self, entry: WriteJob) -> list[tuple[bytes, BlockRecord, bytes]] | None:
        return self.write_job(entry)

    def remove(self, key: bytes) -> None:
        self.drop(key)

    def keys(self) -> Iterator[bytes]:
        return (key for key, _ in self.index.items())

    def records(self) -> dict[bytes, BlockRecord]:
        return {k: r for k, r in self.index.items() if r is not None}

    def remove_many(self, keys: list[bytes]) -> int:
        """Remove entries (index first, then the files), EVICT_BATCH to a transaction;
        returns those the index held. A file that cannot be removed stays counted (a stray)
        and the first such error is raised once every other file is removed."""
        removed, failed = 0, None
        for start in range(0, len(keys), EVICT_BATCH):
            # In key order: files of one subdirectory, and records of one index page, go
            # together (a fraction of the cost of the LRU order's scattered keys).
            batch = sorted(keys[start : start + EVICT_BATCH])
            removed += len(self.index.remove_many(batch))
            for key in batch:
                try:
                    self._remove_file(key.hex())
                except OSError as exc:
                    failed = failed or exc
        if failed is not None:
            raise failed
        return removed

    def read_checked(self, key: bytes, record: BlockRecord | None = None) -> ParsedBlock:
        """A file read and checked against its index record alone (size, checksum, format,
        tokens, array lengths): what `kvtier verify` checks; DamagedBlock if it fails."""
        record = record or self.index.get(key)
        if record is None:
            raise DamagedBlock("not indexed")
        parsed = self.read_parsed(key.hex(), record)
        to_mlx(parsed)  # every dtype is one MLX knows
        check_block(parsed, key, record.kind, record=record)
        return parsed

    def drop_damaged(self, key: bytes, exc: DamagedBlock) -> None:
        log.warning("cache entry %s is damaged (%s): treated as a miss and dropped", key.hex(), exc)
        self.count("damaged_blocks", 1)
        try:
            self.drop(key)
        except (OSError, lmdb.Error) as error:  # a miss all the same
            self._disk_failed(error)

    def take_retry(self) -> bool:
        """True once after the disk took writes again: rewrite what failed before."""
        due, self.retry_due = self.retry_due, False
        return due

    def stats(self) -> dict:
        """The disk part of the one stats schema (docs/api.md)."""
        disk_bytes, entries = self.index.totals()
        error = self.disk_error
        return {"entries": entries, "bytes": disk_bytes, "index_bytes": self.index.disk_usage(),
                "used_bytes": self.disk_used(), "budget": self.budget, "writable": error is None,
                "error": error, "full": self.space.is_full,
                "index_rebuilding": self.rebuilder.running}

    def close(self) -> None:
        self._closing.set()  # before the rebuild stops: the sweep must not follow a partial one
        self.rebuilder.stop()
        if self._upkeep is not None:
            self._upkeep.join()
        if self._owns_index:
            self.index.close()  # LMDB's close is idempotent: a second close does nothing
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def __enter__(self) -> "LocalDisk":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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

