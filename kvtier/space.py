"""Free space on the filesystem under the disk tier: how much of the budget the disk can
actually hold, and a steady "disk full" state while the disk, not the budget, is the limit."""

from __future__ import annotations

import errno
import logging
import threading

from .config import format_size
from .disk import BlockFiles

log = logging.getLogger("kvtier.space")


def free_space_reserve(total: int) -> int:
    """Bytes left free for the index to grow and for other programs: 1% of the filesystem,
    between 1 MiB and 256 MiB."""
    return min(max(total // 100, 1 << 20), 256 << 20)


def is_no_space(exc: BaseException) -> bool:
    """ENOSPC or a full quota, from the filesystem or from LMDB (which reports it as text)."""
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left" in text or "Disk quota exceeded" in text


class DiskSpace:
    """Entered when a write had to evict for lack of space or failed with ENOSPC; left once
    free space is back by a margin of two of the largest writes seen (at least the reserve),
    so the state does not flicker with every write the cache squeezes into what is left."""

    def __init__(self, files: BlockFiles, budget: int):
        self._files, self._budget = files, budget
        self._lock = threading.Lock()
        self._full_reason: str | None = None
        self._largest_write = 0

    def capacity(self, used: int) -> int:
        """What the cache may occupy now: its budget, or less when the disk cannot hold it."""
        free, total = self._files.free_space()
        return min(self._budget, used + free - free_space_reserve(total))

    @property
    def is_full(self) -> bool:
        return self._full_reason is not None

    def note_write(self, nbytes: int) -> None:
        self._largest_write = max(self._largest_write, nbytes)

    def mark_full(self, reason: str) -> None:
        with self._lock:
            if self._full_reason is None:
                log.warning("the disk is full (%s): evicting to make room, serving from RAM what "
                            "does not fit", reason)
            self._full_reason = reason

    def full_message(self, used: int) -> str | None:
        """The "disk full" report while it lasts; None (and the state left) once space is back."""
        with self._lock:
            if self._full_reason is None:
                return None
            try:
                free, total = self._files.free_space()
            except OSError:
                return self._message(used, None)
            reserve = free_space_reserve(total)
            if free - reserve >= min(max(reserve, 2 * self._largest_write), self._budget - used):
                log.info("free space is back (%s): the disk tier grows again", format_size(free))
                self._full_reason = None
                return None
            return self._message(used, free)

    def _message(self, used: int, free: int | None) -> str:
        room = f"{format_size(free)} free, " if free is not None else ""
        return (f"disk full (No space left on device): {room}the cache holds {format_size(used)} of "
                f"its {format_size(self._budget)} budget; {self._full_reason}")
