"""The local disk tier shared by every store of one cache directory in the process: LMDB
allows one open environment per file in a process, so the stores of several models (one
daemon serving many) share one LocalDisk (its index, files, budget, upkeep thread and
rebuilder), opened by the first store and closed with the last."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .config import format_size
from .local import LocalDisk
from .tier import Count

log = logging.getLogger("kvtier.local")


class DiskCounts:
    """The shared disk's counter: a disk event (a write error, an eviction, a rebuild) is
    added to every store using the disk, so none is lost when the store that opened it closes."""

    def __init__(self) -> None:
        self._counts: list[Count] = []
        self._lock = threading.Lock()

    def attach(self, count: Count) -> None:
        with self._lock:
            self._counts.append(count)

    def detach(self, count: Count) -> None:
        with self._lock:
            if count in self._counts:
                self._counts.remove(count)

    def __call__(self, name: str, amount: int = 1) -> None:
        with self._lock:
            counts = list(self._counts)
        for count in counts:
            count(name, amount)


@dataclass
class _Shared:
    disk: LocalDisk
    counts: DiskCounts
    users: list[Count] = field(default_factory=list)


_open: dict[Path, _Shared] = {}
_lock = threading.Lock()  # held while a disk opens or closes: never two environments on one file


def _key(cache_dir: Path) -> Path:
    return Path(cache_dir).expanduser().resolve()


def open_disk(cache_dir: Path, budget: int, count: Count, fingerprint: str) -> LocalDisk:
    """The process's LocalDisk of `cache_dir`, opened now if no store uses it yet. A later
    store's different budget is not applied (the disk has one): the first one's is kept."""
    with _lock:
        shared = _open.get(_key(cache_dir))
        if shared is None:
            counts = DiskCounts()
            counts.attach(count)
            disk = LocalDisk.open(cache_dir, budget, counts, fingerprint)
            _open[_key(cache_dir)] = _Shared(disk, counts, [count])
            return disk
        if budget != shared.disk.budget:
            log.warning("%s is open already with a disk budget of %s: kept (not %s)", cache_dir,
                        format_size(shared.disk.budget), format_size(budget))
        shared.counts.attach(count)
        shared.users.append(count)
        return shared.disk


def release_disk(disk: LocalDisk, count: Count | None = None) -> None:
    """A store is done with `disk`: closed once no store uses it. A disk not opened by
    `open_disk` (a test's own) is closed now."""
    with _lock:
        key = next((k for k, shared in _open.items() if shared.disk is disk), None)
        if key is not None:
            shared = _open[key]
            if count is not None and count not in shared.users:
                return  # released already (a store closed twice)
            count = count if count is not None else shared.users[-1]
            shared.users.remove(count)
            shared.counts.detach(count)
            if shared.users:
                return
            del _open[key]
        disk.close()


def retain(disk: LocalDisk) -> Count | None:
    """Keep `disk` open beyond its stores (a daemon unloading one model to load another must
    not close and reopen its index between them); `release_disk(disk, token)` lets it go."""

    def holder(name: str, amount: int = 1) -> None:
        """Counts nothing: it only holds the disk open."""

    with _lock:
        shared = next((s for s in _open.values() if s.disk is disk), None)
        if shared is None:
            return None  # not a shared disk (a RAM-only store's, a test's own)
        shared.users.append(holder)
    return holder


def users(cache_dir: Path) -> int:
    """How many stores use the process's disk of `cache_dir` (0: not open)."""
    with _lock:
        shared = _open.get(_key(cache_dir))
        return len(shared.users) if shared is not None else 0
