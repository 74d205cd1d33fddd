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
from pathlib import Path

import lmdb
import numpy as np

from .checks import check_block
from .disk import (
    BlockFiles,
    DamagedBlock,
    ParsedBlock,
    allocated_bytes,
    parse_block,
    to_mlx,
)
from .index import BlockRecord, Index, open_or_replace
from .local_upkeep import PROBE_SECONDS, Upkeep
from .local_writes import DiskWrites, error_text
from .measured import DIR_NAME
from .reindex import Rebuilder
from .space import DiskSpace
from .tier import Count
from .writer import WriteJob

log = logging.getLogger("kvtier.local")

SCRATCH_PREFIX = "kvtier-ram-only-"  # + owner pid + "-": the index of a daemon without a disk tier


def _no_count(name: str, amount: int = 1) -> None:
    """The CLI keeps no counters."""


class LocalDisk:
    """The local SSD tier: entries are BlockRecords, read as ParsedBlocks (the store reads it
    through disk_tier.DiskTier). Its writes and their failures are local_writes.py's, its
    upkeep thread local_upkeep.py's."""

    name = "disk"

    def __init__(self, path: Path, index: Index, files: BlockFiles, budget: int,
                 count: Count = _no_count, probe_fingerprint: str = "",
                 scratch: Path | None = None, write_error: str | None = None, dirs_bytes: int = 0,
                 owns_index: bool = True):
        self.path, self.files, self.budget = Path(path), files, budget
        self.index = index
        # A block's record names its own model (its write job's); this one is only whose
        # counters the upkeep's probe write touches (changing nothing).
        self.count, self.probe_fingerprint = count, probe_fingerprint
        self.owns_index = owns_index
        self.scratch = scratch  # set when the cache directory cannot be used
        self.dirs_bytes = dirs_bytes  # the cache directory's own and its index directory's
        self.index_replaced = threading.Event()
        self.space = DiskSpace(files, budget)
        self.writes = DiskWrites(self, write_error)
        self.upkeep = Upkeep(self)
        self.swept = self.upkeep.swept  # set once the start-up cleanup is done
        self.rebuilder = Rebuilder(index, files)

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, cache_dir: Path, budget: int, count: Count,
             fingerprint: str) -> "LocalDisk":
        """The daemon's disk tier: the cache directory's index and files; when it cannot be
        used (no permission, a read-only or full disk), an empty private index in a temporary
        directory, and the tier off: the daemon still serves, from RAM, and says why in its
        stats. A damaged index is replaced by an empty one, refilled from the files.
        One per cache directory in a process (LMDB's rule): stores open it through
        disk_registry.open_disk, which shares it."""
        try:
            cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            _make_private(cache_dir)
            index, files = open_or_replace(cache_dir / "index"), BlockFiles(cache_dir / "blocks")
            dirs_bytes = sum(p.stat().st_blocks * 512 for p in (cache_dir, cache_dir / "index"))
            disk = cls(cache_dir, index, files, budget, count, fingerprint, dirs_bytes=dirs_bytes)
        except (OSError, lmdb.Error) as exc:
            count("disk_write_errors", 1)
            error = error_text(exc)
            log.error("cache directory %s is unusable (%s): serving from RAM only, nothing is written "
                      "to disk", cache_dir, error)
            remove_stale_scratch_dirs()  # those of RAM-only daemons killed before their cleanup
            scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
            disk = cls(cache_dir, Index(scratch / "index"), BlockFiles(scratch / "blocks"), budget, count,
                       fingerprint, scratch=scratch, write_error=error)
        disk.index.on_damage = disk.index_damaged
        if disk.index.rebuild_pending():
            disk.count("index_rebuilds", 1)
            disk.rebuilder.start()
        disk.upkeep.start(remove_stale_scratch_dirs)
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

    def index_damaged(self, reason: str) -> None:
        """The index met damage at run time (in whichever thread): go on with a fresh one,
        refilled from the block files in the background; this access was a miss."""
        self.count("index_rebuilds")
        self.index_replaced.set()  # the start-up sweep stops: the new index lacks the files
        try:
            self.index.reset(reason)
        except (OSError, lmdb.Error) as exc:
            self.writes.failed(exc)
            return
        self.rebuilder.start()

    @property
    def disk_error(self) -> str | None:
        """Why the disk tier does not take every write now (it cannot write, or the disk is
        full); None when it does. Re-checked on each call, so it clears by itself."""
        if self.writes.error is not None or not self.disk_enabled:
            return self.writes.error
        if self.upkeep.vanished():
            return f"{self.path} or its index was deleted: it is made again within {PROBE_SECONDS:.0f} s"
        try:
            return self.space.full_message(self.disk_used())
        except OSError as exc:  # the cache directory itself is gone
            return error_text(exc)

    @property
    def disk_enabled(self) -> bool:
        return self.budget > 0 and self.scratch is None

    @property
    def retry_due(self) -> bool:
        """The disk takes writes again: what failed before is to be rewritten."""
        return self.writes.retry_due

    def take_retry(self) -> bool:
        """True once after the disk took writes again: rewrite what failed before."""
        return self.writes.take_retry()

    def read_parsed(self, key_hex: str, record: BlockRecord) -> ParsedBlock:
        return parse_block(self.files.read(key_hex, record.checksum, record.nbytes))

    def read_into(self, key_hex: str, record: BlockRecord, targets: dict[str, np.ndarray]) -> ParsedBlock:
        """The file read straight into `targets` (BlockFiles.read_into), checked as `read_parsed` checks it."""
        return self.files.read_into(key_hex, record.checksum, record.nbytes, targets)

    def write_job(self, job: WriteJob, count: Count | None = None) -> list[tuple[bytes, BlockRecord, bytes]] | None:
        """Run a write job (DiskWrites.write_job): what got indexed, None if nothing did;
        its writes counted by `count` (its store's) when given."""
        return self.writes.write_job(job, count)

    def note_in_index(self, write, *args) -> None:
        """Best-effort index bookkeeping (access times, counters): a full or read-only disk
        must not fail a request that RAM can serve."""
        try:
            write(*args)
        except lmdb.Error as exc:
            self.writes.failed(exc)

    def disk_used(self) -> int:
        """What the disk tier occupies, as the filesystem (and `du`) counts it: the blocks
        allocated for every file, the directories, the index, and leftovers not removed yet."""
        return (self.index.allocated() + self.dirs_bytes + self.files.dir_bytes() + self.index.disk_usage()
                + self.writes.strays.nbytes)

    def evict_to(self, target: int) -> int:
        """Evict least recently used entries until the tier takes at most `target` bytes,
        counted as the budget counts them (`kvtier purge --to-size`); returns the entries removed."""
        before = self.index.totals()[1]
        self.writes.evict_while(lambda: self.disk_used() - target, prune=False)
        return before - self.index.totals()[1]

    def drop(self, key: bytes) -> None:
        """Remove an entry from disk: index entry first, then the file."""
        self.index.remove(key)
        self.writes.remove_file(key.hex())

    def remove_many(self, keys: list[bytes]) -> int:
        """Remove entries, index first (DiskWrites.remove_many); returns those the index held."""
        return self.writes.remove_many(keys)

    def sweep_leftovers(self) -> int:
        """Remove what a killed daemon left behind (Upkeep.sweep_leftovers)."""
        return self.upkeep.sweep_leftovers()

    # -- what the CLI needs ---------------------------------------------------------------
    def records(self) -> dict[bytes, BlockRecord]:
        return {k: r for k, r in self.index.items() if r is not None}

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
            self.writes.failed(error)

    def stats(self) -> dict:
        """The disk part of the one stats schema (docs/api.md)."""
        disk_bytes, entries = self.index.totals()
        error = self.disk_error
        return {"entries": entries, "bytes": disk_bytes, "index_bytes": self.index.disk_usage(),
                "used_bytes": self.disk_used(), "budget": self.budget, "writable": error is None,
                "error": error, "full": self.space.is_full,
                "index_rebuilding": self.rebuilder.running}

    def close(self) -> None:
        self.upkeep.stop()  # before the rebuild stops: the sweep must not follow a partial one
        self.rebuilder.stop()
        self.upkeep.join()
        if self.owns_index:
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
        if path == cache_dir and (foreign := set(os.listdir(cache_dir)) - {"index", "blocks", DIR_NAME}):
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

