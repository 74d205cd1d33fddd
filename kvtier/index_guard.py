"""How the index meets damage at run time (kvtier/index.py wraps each of its methods in one
of these): a read that cannot read is a miss, a write or a full walk raises IndexDamaged (an
lmdb.Error, so callers treat it like any failed disk write); either way the owner is told
once (`on_damage`: the daemon resets the index and rebuilds it from the block files).
"""

from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path
from typing import Callable

import lmdb

from .index_file import DAMAGE_ERRORS, IndexDamaged, move_aside

log = logging.getLogger("kvtier.index")


class Guarded:
    """The run-time damage state of an LMDB file that a subclass opens in `_open`, and
    opens again, fresh, in `reset`."""

    def __init__(self, path: Path):
        self.path = path
        self.damage: str | None = None  # set when damage is met at run time
        self.on_damage: Callable[[str], None] | None = None  # the daemon recovers here
        self._generation = 0  # bumped by reset: late errors from the old file are ignored
        self._reset_lock = threading.RLock()

    def _open(self) -> None:
        raise NotImplementedError

    def _reopened(self, reason: str) -> None:
        """Give the fresh file a reset made what it needs (called under the reset's lock)."""

    def _failed(self, exc: lmdb.Error, generation: int) -> None:
        if not isinstance(exc, DAMAGE_ERRORS):
            log.warning("index read failed (%s): treated as a miss", exc)
            return
        with self._reset_lock:  # two threads meeting it at once: one reset
            if generation != self._generation or self.damage is not None:
                return  # already known, or from the file a reset replaced
            self.damage = f"{type(exc).__name__}: {exc}"
        log.error("the index %s is damaged (%s)", self.path, self.damage)
        if self.on_damage is not None:
            self.on_damage(self.damage)

    def reset(self, reason: str) -> Path:
        """Move this index aside and go on with a fresh, empty one marked for a rebuild
        from the files. Threads still inside the old one finish on it (it is closed when the
        last of them lets go). Returns where the old one went."""
        with self._reset_lock:
            # Deleted under us (with the cache directory, maybe): made again (local_upkeep.Upkeep._remake).
            aside = move_aside(self.path) if self.path.exists() else self.path
            self.path.mkdir(mode=0o700)
            self._open()
            self._generation += 1
            self.damage = None
            self._reopened(reason)
        if aside != self.path:
            log.warning("the damaged index was moved to %s; a fresh one is rebuilt from the block files", aside)
        return aside

    def _damage_error(self, exc: lmdb.Error, generation: int) -> IndexDamaged:
        self._failed(exc, generation)
        return IndexDamaged(f"{self.path}: {type(exc).__name__}: {exc}")


def reads(empty: Callable[[], object]):
    """A read that meets an index it cannot read returns `empty()`: a miss, never an error."""
    def wrap(method):
        @functools.wraps(method)
        def guarded(self: Guarded, *args, **kwargs):
            generation = self._generation
            try:
                return method(self, *args, **kwargs)
            except lmdb.Error as exc:
                self._failed(exc, generation)
                return empty()
        return guarded
    return wrap


def writes(method):
    """A write that meets a damaged index raises IndexDamaged after reporting the damage."""
    @functools.wraps(method)
    def guarded(self: Guarded, *args, **kwargs):
        generation = self._generation
        try:
            return method(self, *args, **kwargs)
        except DAMAGE_ERRORS as exc:
            raise self._damage_error(exc, generation) from exc
    return guarded


def must_read(method):
    """A read whose caller must stop rather than take "nothing" for an answer (the leftover
    sweep: "no record" would make every block file a leftover): damage raises IndexDamaged
    after reporting it, as a write does."""
    return writes(method)


def walks(method):
    """A walk (a generator) that meets a damaged page raises IndexDamaged after reporting
    it: a partial list is not the list."""
    @functools.wraps(method)
    def guarded(self: Guarded, *args, **kwargs):
        generation = self._generation
        try:
            yield from method(self, *args, **kwargs)
        except DAMAGE_ERRORS as exc:
            raise self._damage_error(exc, generation) from exc
    return guarded
