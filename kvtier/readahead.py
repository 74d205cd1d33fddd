"""Block files (or shared values) read on a thread pool ahead of the restore loop, in chain
order and within a byte window: reads overlap the work on earlier blocks."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Callable, Generic, Mapping, Protocol, Sequence, TypeVar

from .blocks import BlockRef

READ_AHEAD_BYTES = 256 << 20  # how far the read-ahead reads past the block in use


class Sized(Protocol):
    """What a read-ahead plans each block by (a disk record, a shared value's size): its bytes."""

    @property
    def nbytes(self) -> int: ...


Planned = TypeVar("Planned", bound=Sized)


class ReadAhead(Generic[Planned]):
    """Block files read on a thread pool in chain order, at most `window_bytes` ahead of the
    block being used: reads overlap the work on earlier blocks, and what is read but not yet
    used (or never used, when the chain breaks) stays bounded: memory where files are read
    whole, the disk's wasted work where they are read into a prompt's buffers."""

    def __init__(self, pool: ThreadPoolExecutor, read: Callable[[str, Planned], object],
                 planned: list[tuple[BlockRef, Planned]], window_bytes: int = READ_AHEAD_BYTES):
        self._pool, self._window = pool, window_bytes
        self._read: Callable[[str, Planned], object] = read
        self._planned: deque[tuple[BlockRef, Planned]] = deque(planned)
        self._started: dict[bytes, tuple[Planned, Future]] = {}
        self._started_bytes = 0
        self._top_up()

    def take(self, key: bytes) -> tuple[Planned, Future] | None:
        """The record and pending read of `key`'s file, if it was planned."""
        started = self._started.pop(key, None)
        if started is not None:
            self._started_bytes -= started[0].nbytes
            self._top_up()
        return started

    def cancel(self) -> None:
        """Drop the reads not yet needed; wait for those already running (they may be
        writing into a prompt's buffers, which the caller is about to use)."""
        running = [future for _, future in self._started.values() if not future.cancel()]
        wait(running)
        self._started.clear()
        self._planned.clear()

    def _top_up(self) -> None:
        # At least two files in flight whatever their size, so reading never stalls.
        while self._planned and (len(self._started) < 2 or self._started_bytes < self._window):
            ref, record = self._planned.popleft()
            self._started[ref.key] = (record, self._pool.submit(self._read, ref.hex, record))
            self._started_bytes += record.nbytes


def first_bytes(planned: Sequence[tuple[BlockRef, Sized]], limit: int) -> list[str]:
    """The keys of the leading planned files that hold `limit` bytes in all."""
    keys, total = [], 0
    for ref, record in planned:
        if total >= limit:
            break
        keys.append(ref.hex)
        total += record.nbytes
    return keys


def chain_plan(refs: Sequence[BlockRef], held: Mapping[bytes, Planned]) -> list[tuple[BlockRef, Planned]]:
    """The leading blocks of a chain that a tier holds (`held`: what it planned each by): a
    chain cannot go past its first missing block."""
    planned = []
    for ref in refs:
        if ref.key not in held:
            break
        planned.append((ref, held[ref.key]))
    return planned
