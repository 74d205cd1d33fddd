"""What lies under a cache's block directory besides its indexed block files, for `kvtier
stats` (so that what it counts is what `du` counts) and `kvtier verify` (which lists it, and
with --fix removes what is ours).

Ours: temp files of a write or probe that a kill interrupted, block files written but never
indexed (orphans), and directories standing in a block file's place. Foreign: every name
kvtier never writes. Foreign files are reported, never removed: kvtier did not make them, and
a cache directory that holds other files is refused rather than changed (local._make_private).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .disk import SUBDIR_NAME, BlockFiles, is_temp_name, key_of_path
from .index import Index

OURS = ("temp_file", "orphan_file", "not_a_file")


@dataclass
class Stray:
    kind: str  # temp_file, orphan_file, not_a_file (ours); foreign_file
    path: Path
    key: str  # the block key its name carries, "" for none
    nbytes: int  # what it occupies, as du counts it
    mtime: float

    @property
    def ours(self) -> bool:
        return self.kind in OURS


def strays(files: BlockFiles, index: Index) -> list[Stray]:
    """Every entry under the block root that is not an indexed block file: one listing per
    subdirectory and one index look-up per block file name (as the daemon's sweep does)."""
    found: list[Stray] = []
    for entry in _listing(files.root):
        if entry.is_dir(follow_symlinks=False) and SUBDIR_NAME.fullmatch(entry.name):
            found += in_subdir(Path(entry.path), index)
        else:  # only a probe's temp file belongs at the top
            found += _stray("temp_file" if is_temp_name(entry.name) else "foreign_file", entry, "")
    return found


def in_subdir(subdir: Path, index: Index) -> list[Stray]:
    """A block subdirectory's strays (also the daemon's sweep: local_upkeep.Upkeep._sweep)."""
    entries = _listing(subdir)
    keys = {entry.name: key_of_path(Path(entry.name)) for entry in entries}
    indexed = {key.hex() for key in index.has_many([bytes.fromhex(k) for k in keys.values() if k])}
    found = []
    for entry in entries:
        key = keys[entry.name]
        if key is not None and key in indexed:
            continue  # its record is checked against it (verify), and counted (stats)
        if key is None and not is_temp_name(entry.name):
            kind = "foreign_file"
        elif not entry.is_file(follow_symlinks=False):
            kind = "not_a_file"  # a directory (or link) under one of our names
        else:
            kind = "orphan_file" if key is not None else "temp_file"
        found += _stray(kind, entry, key or "")
    return found


def _stray(kind: str, entry: os.DirEntry, key: str) -> list[Stray]:
    """The entry as a stray; none if it is gone since the listing (a write renamed it)."""
    try:
        stat = entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return []
    return [Stray(kind, Path(entry.path), key, _du(entry, stat.st_blocks * 512), stat.st_mtime)]


def _du(entry: os.DirEntry, own: int) -> int:
    """Bytes allocated for an entry and, for a directory, everything beneath it."""
    if not entry.is_dir(follow_symlinks=False):
        return own
    total = own
    for root, dirs, names in os.walk(entry.path):
        for name in dirs + names:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                continue
    return total


def _listing(directory: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(directory) as listing:
            return sorted(listing, key=lambda e: e.name)
    except OSError:  # gone, or unreadable: nothing to report from it
        return []


def summary(found: list[Stray]) -> dict:
    """Files and bytes of ours (leftovers) and of foreign files, for stats."""
    ours = [s for s in found if s.ours]
    foreign = [s for s in found if not s.ours]
    return {"leftover_files": len(ours), "leftover_bytes": sum(s.nbytes for s in ours),
            "foreign_files": len(foreign), "foreign_bytes": sum(s.nbytes for s in foreign)}
