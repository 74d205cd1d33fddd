"""The local disk tier's upkeep thread: after start-up, what a killed daemon left behind
swept; then, while writes fail, the disk tried again so the
error clears by itself, and a cache directory deleted under the daemon made again. Part of
local.LocalDisk."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import lmdb

from .disk import BlockFiles, allocated_bytes
from .index import Index
from .leftovers import in_subdir
from .local_writes import DiskWrites, error_text
from .reindex import Rebuilder
from .space import DiskSpace, is_no_space

log = logging.getLogger("kvtier.local")

PROBE_SECONDS = 2.0  # while writes fail, how often the disk is tried again


class Disk(Protocol):
    """What the upkeep needs of the disk tier (local.LocalDisk)."""

    path: Path
    index: Index
    files: BlockFiles
    space: DiskSpace
    writes: DiskWrites
    rebuilder: Rebuilder
    probe_fingerprint: str
    owns_index: bool
    dirs_bytes: int
    index_replaced: threading.Event

    @property
    def disk_enabled(self) -> bool: ...

    def note_in_index(self, write: Callable[..., Any], *args: Any) -> None: ...

    def index_damaged(self, reason: str) -> None: ...


class Upkeep:
    """`disk`'s background upkeep; `swept` is set once the start-up cleanup is done."""

    def __init__(self, disk: Disk):
        self.disk = disk
        self.started_at = time.time()
        self.closing = threading.Event()
        self.swept = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, remove_stale_scratch_dirs) -> None:
        self._thread = threading.Thread(target=self._loop, args=(remove_stale_scratch_dirs,),
                                        name="kvtier-disk-upkeep", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.closing.set()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def _loop(self, remove_stale_scratch_dirs) -> None:
        disk = self.disk
        try:
            if disk.disk_enabled:
                disk.rebuilder.wait()  # files a rebuild has not reached yet are not leftovers
                self.sweep_leftovers()
            remove_stale_scratch_dirs()
        except Exception:  # upkeep must never take the daemon down
            log.exception("start-up cleanup of %s failed", disk.files.root)
        self.swept.set()
        while not self.closing.wait(PROBE_SECONDS):
            if self.vanished():
                self._remake()
            if disk.writes.error is not None and disk.disk_enabled:
                self._probe_disk()

    def vanished(self) -> bool:
        """Whether the cache directory, or its index, was deleted under the daemon (LMDB
        would go on writing to the deleted file: lost at the next start)."""
        disk = self.disk
        return disk.disk_enabled and disk.owns_index and not (disk.path / "index" / "data.mdb").exists()

    def _remake(self) -> None:
        """Make the deleted directory and index again, the index refilled from what block
        files are left (none if the whole directory went); blocks are written there from now
        on. What only the deleted files held is gone: those prompts are computed again."""
        disk = self.disk
        log.warning("%s or its index was deleted under the daemon: made again", disk.path)
        try:
            disk.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:  # its parent is read-only now, say: RAM only until the probe succeeds
            disk.writes.failed(exc)
            return
        disk.index_damaged(f"{disk.path / 'index'} was deleted")
        disk.dirs_bytes = sum(allocated_bytes(p) for p in (disk.path, disk.path / "index"))

    def sweep_leftovers(self) -> int:
        """Remove temp files and unindexed block files older than this process: a killed
        daemon's (only one daemon owns a cache directory). One listing per subdirectory and
        the index's keys, no file is opened; our own writer's files are safe, as a
        subdirectory is swept only between its jobs. Returns the files removed."""
        removed = 0
        for subdir in self.disk.files.subdirs():
            if self.closing.is_set():
                break
            with self.disk.writes.files_lock:
                removed += self._sweep(subdir)
        if removed:
            log.info("removed %d files left behind in %s", removed, self.disk.files.root)
        return removed

    def _sweep(self, subdir: Path) -> int:
        found = in_subdir(subdir, self.disk.index)
        if self.disk.rebuilder.running or self.disk.index_replaced.is_set():
            return 0  # an index being refilled does not list every file yet
        removed = 0
        for stray in found:
            # Foreign files are reported by `kvtier verify`, never removed; a file newer than
            # this process is not a leftover: someone is writing it now.
            if stray.kind not in ("temp_file", "orphan_file") or stray.mtime >= self.started_at:
                continue
            try:
                stray.path.unlink()
                removed += 1
            except FileNotFoundError:
                continue
            except OSError:
                self.disk.writes.strays.note(stray.path)
        return removed

    def _probe_disk(self) -> None:
        disk, writes = self.disk, self.disk.writes
        try:
            disk.files.probe()
            disk.index.add_counters(disk.probe_fingerprint, {})  # an index write, changing nothing
        except (OSError, lmdb.Error) as exc:
            if not is_no_space(exc):
                writes.error = error_text(exc)
                return
            disk.space.mark_full(error_text(exc))  # writable again, but full: reported as such
        log.info("the disk tier accepts writes again")
        writes.error = None
        writes.retry_due = True
