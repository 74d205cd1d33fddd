"""Background disk writer: takes blocks off the request path through a byte-bounded queue.

A full queue makes the producer wait (back-pressure). The writer only writes: the RAM tier
holds every block of a queued job, findable, until the write function returns (see
TieredStore._submit), so this queue's bound (plus a job waiting to enter) is also how far
RAM can exceed its budget.
A failed write (disk full, read-only) is recorded by the write function; its blocks stay in
RAM unwritten, retried by the next flush or once the disk accepts writes again, for as long
as the RAM budget keeps them; evicted before that, they are dropped, counted and logged
(`ram_evictions_unwritten`), never silently.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger("kvtier.writer")


@dataclass
class Entry:
    key: bytes
    payload: bytes | None  # None: remove this key from disk
    block: Any = None  # what the write function needs to index it


@dataclass
class WriteJob:
    """Entries written, then indexed in one transaction: a request's blocks and snapshots
    land together or not at all."""

    entries: list[Entry]
    fingerprint: str = ""  # the model whose entries they are: its records name it
    note: Callable[[], None] | None = None  # bookkeeping after them (access times, counters)

    @property
    def nbytes(self) -> int:
        return sum(len(e.payload) for e in self.entries if e.payload)


class DiskWriter:
    def __init__(self, write_fn: Callable[[WriteJob], None], max_bytes: int):
        self._write_fn = write_fn
        self._max_bytes = max_bytes
        self._jobs: deque[WriteJob] = deque()
        self._pending_bytes = 0
        self._busy = False
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="kvtier-disk-writer", daemon=True)
        self._thread.start()

    def submit(self, job: WriteJob) -> None:
        with self._cond:
            # Wait for room, but always admit one job so a huge block cannot deadlock; a job
            # of bookkeeping alone (no bytes) never waits.
            while job.nbytes and self._jobs and self._pending_bytes + job.nbytes > self._max_bytes:
                self._cond.wait()
            self._jobs.append(job)
            self._pending_bytes += job.nbytes
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted job is done; True if the queue drained in time."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs and not self._busy, timeout)

    @property
    def pending(self) -> tuple[int, int]:
        with self._cond:
            return len(self._jobs), self._pending_bytes

    def close(self) -> None:
        self.flush()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._jobs or self._closed)
                if not self._jobs:
                    return
                job = self._jobs[0]
                self._busy = True
            try:
                self._write_fn(job)
            except Exception:  # keep the writer alive whatever one block does
                log.exception("writing %d cache entries failed", len(job.entries))
            with self._cond:
                self._jobs.popleft()
                self._pending_bytes -= job.nbytes
                self._busy = False
                self._cond.notify_all()
