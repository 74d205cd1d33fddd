"""Rebuild the index from the block files, after the index was found damaged or of another
schema version (kvtier/index.py: an older or newer kvtier's).

Every file carries what its index record holds: its key, parent, depth, fingerprint and
kind in its metadata, its tokens, and a hash of its tensors (`content`). A file is indexed
again only if all of it checks out: the key is the one its parent and tokens give, and the
tensors hash to `content`. Anything else (damaged, or written before files carried their
parent) is removed, as an orphan would be. Pins and access order are not in the files: the
rebuilt records take the file's modification time and are unpinned.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from .blocks import encode_tokens, tokens_hash
from .checks import check_block
from .disk import BlockFiles, DamagedBlock, allocated_bytes, checksum, key_of_path, parse_block, remove_path
from .index import BlockRecord, Index, IndexDamaged

log = logging.getLogger("kvtier.reindex")

BATCH = 256  # records per index transaction


@dataclass
class RebuildReport:
    indexed: int = 0
    removed: int = 0  # files that could not be indexed again


def rebuild(index: Index, files: BlockFiles, stop: threading.Event | None = None) -> RebuildReport:
    """Index every block file the index does not hold yet; remove those that fail a check.
    Safe while the daemon writes: a key it indexed meanwhile is left as it is. The caller
    clears the index's rebuild mark once no other pass is due."""
    report, batch = RebuildReport(), []
    for path in files.iter_files():
        if stop is not None and stop.is_set():
            return report
        key_hex = key_of_path(path)
        if key_hex is None:
            continue  # a temp file: a write in flight, or `verify`'s to remove
        entry = _entry_of(path, key_hex)
        if entry is None:
            remove_path(path)  # a directory in a block file's place too
            report.removed += 1
            continue
        batch.append(entry)
        if len(batch) >= BATCH:
            report.indexed += _index_missing(index, batch)
            batch = []
    report.indexed += _index_missing(index, batch)
    return report


def _index_missing(index: Index, entries: list[tuple[bytes, BlockRecord, bytes]]) -> int:
    present = index.get_many([key for key, _, _ in entries])
    missing = [e for e in entries if e[0] not in present]
    if missing:
        index.put_many(missing)
    return len(missing)


def _entry_of(path: Path, key_hex: str) -> tuple[bytes, BlockRecord, bytes] | None:
    """The index entry (key, record, tokens) of a block file, or None if it fails a check."""
    try:
        payload = path.read_bytes()
        stamp = int(path.stat().st_mtime * 1000)
        parsed = parse_block(payload)
        meta = parsed.metadata
        key, parent, depth = bytes.fromhex(key_hex), bytes.fromhex(meta["parent"]), int(meta["depth"])
        kind, fingerprint = meta["kind"], meta["fingerprint"]
        if meta["key"] != key_hex or len(key) != 16 or len(parent) != 16 or depth < 0:
            raise DamagedBlock("key, parent or depth differ from the file name")
        check_block(parsed, key, kind, parent=parent, content=True)
    except (OSError, DamagedBlock, KeyError, ValueError) as exc:
        log.info("block file %s is not indexed again (%s): removed", path.name, exc)
        return None
    record = BlockRecord(parent=parent.hex(), fingerprint=fingerprint, depth=depth,
                         num_tokens=len(parsed.tokens), nbytes=len(payload), checksum=checksum(payload),
                         tokens_hash=tokens_hash(parsed.tokens), access_ms=stamp, created_ms=stamp,
                         allocated=allocated_bytes(path), kind=kind)
    return key, record, encode_tokens(parsed.tokens)


class Rebuilder:
    """Runs `rebuild` on a background thread, so the daemon serves (from what is indexed
    already) while it runs; asked again while running, it goes over the files once more."""

    def __init__(self, index: Index, files: BlockFiles):
        self.index, self.files = index, files
        self._lock = threading.RLock()  # a reset met while holding it calls start()
        self._stop = threading.Event()
        self._again = self._active = False
        self._thread: threading.Thread | None = None
        self.last: RebuildReport | None = None

    @property
    def running(self) -> bool:
        return self._active

    def start(self) -> None:
        with self._lock:
            self._again = True
            if self._active or self._stop.is_set():
                return
            self._active = True
            self._thread = threading.Thread(target=self._run, name="kvtier-reindex", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the rebuild to end; True if it has."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self._active

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._again or self._stop.is_set():
                    self._active = False
                    return
                self._again = False
            try:
                self.last = rebuild(self.index, self.files, self._stop)
                with self._lock:
                    if not self._again and not self._stop.is_set():
                        self.index.mark_rebuild(None)  # else a restart resumes it
                log.info("index rebuilt from the block files: %d entries indexed, %d files removed",
                         self.last.indexed, self.last.removed)
            except IndexDamaged:
                pass  # the index was reset meanwhile, and that asked for another pass
            except Exception:  # noqa: BLE001 - a failed rebuild leaves misses, not a dead daemon
                log.exception("index rebuild failed: the files not indexed are misses")
