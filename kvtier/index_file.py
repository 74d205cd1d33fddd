"""The index's LMDB file itself, apart from what it holds (kvtier/index.py): whether LMDB
can be trusted with it, and what to do with one that cannot.

A damaged file is found before LMDB maps it (both meta pages and the file size: a file
shorter than its last page is a SIGBUS on first touch), then, where asked, by a full read
walk in a child process (`python -m kvtier.index_file PATH`), since LMDB can abort or fault
on a bad page. A damaged index is moved aside, one of another schema version removed
(`set_aside`), unless another process still has it open (`in_use`).
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import lmdb

log = logging.getLogger("kvtier.index")

MAP_SIZE = 4 << 30  # LMDB's address-space reservation, not disk use
DB_NAMES = (b"blocks", b"lru", b"children", b"models", b"meta", b"heads")
KEY_LENGTHS = {b"blocks": 16, b"lru": 28, b"children": 32, b"heads": 37}

# What LMDB raises for a file it cannot trust (other lmdb.Error are I/O, space, limits).
# MDB_BAD_TXN too: each method here runs a fresh transaction, so a bad one means LMDB
# failed inside it (a named database whose record it could not read, say).
DAMAGE_ERRORS = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError,
                 lmdb.VersionMismatchError, lmdb.IncompatibleError, lmdb.BadTxnError)


class IndexDamaged(lmdb.Error):
    """The index file is corrupt or truncated: move it aside and rebuild it from the files."""


class IndexOutdated(IndexDamaged):
    """The index is of another schema version (an older or a newer kvtier's): it is not read
    but replaced, and rebuilt from the files like a damaged one."""


# -- checks before the file is mapped ------------------------------------------------------
# LMDB's two meta pages (pages 0 and 1), as mdb.c lays them out on 64-bit little-endian
# machines: a page header, then MDB_meta (magic, version, address, mapsize, the free and main
# databases, the last page used, the transaction id). Read only to decide whether LMDB can
# map the file safely: a file shorter than its last page is a SIGBUS on first touch.
_PAGE_HEADER = struct.Struct("<QHHHH")  # pgno, pad, flags, lower, upper
_META = struct.Struct("<IIQQ48s48sQQ")
_DB = struct.Struct("<IHHQQQQQ")  # pad (page size, in the free db), flags, depth, pages x3, entries, root
_MDB_MAGIC, _MDB_VERSION, _P_META, _NO_PAGE = 0xBEEFC0DE, 1, 0x08, (1 << 64) - 1


@dataclass
class MetaPage:
    page_size: int
    map_size: int
    last_page: int
    txnid: int
    roots: tuple[int, int]  # free and main database root pages


def _read_meta(data: bytes, number: int, page_size: int) -> MetaPage | str:
    offset = number * page_size
    if len(data) < offset + _PAGE_HEADER.size + _META.size:
        return f"meta page {number} is cut off"
    pgno, _, flags, _, _ = _PAGE_HEADER.unpack_from(data, offset)
    magic, version, _, map_size, free, main, last_page, txnid = _META.unpack_from(data, offset + _PAGE_HEADER.size)
    if magic != _MDB_MAGIC or not flags & _P_META or pgno != number:
        return f"meta page {number} is not an LMDB meta page"
    if version != _MDB_VERSION:
        return f"meta page {number} has LMDB data version {version}"
    psize, roots = _DB.unpack(free)[0], (_DB.unpack(free)[7], _DB.unpack(main)[7])
    if psize < 512 or psize > 65536 or psize & (psize - 1):
        return f"meta page {number} claims a page size of {psize}"
    if last_page < 1 or any(root != _NO_PAGE and not 1 < root <= last_page for root in roots):
        return f"meta page {number} points outside its pages"
    if map_size < (last_page + 1) * psize:
        return f"meta page {number} claims a map smaller than its pages"
    return MetaPage(psize, map_size, last_page, txnid, roots)


def data_file_problem(data_file: Path) -> str | None:
    """Why LMDB must not map `data_file`, or None. A missing or empty file is fine (LMDB
    creates it); both meta pages must be valid, like LMDB itself requires, and the file must
    hold every page the newest one uses."""
    try:
        size = data_file.stat().st_size
        with data_file.open("rb") as f:
            head = f.read(2 * 65536)
    except FileNotFoundError:
        return None
    if size == 0:
        return None
    first = _read_meta(head, 0, 4096)
    if isinstance(first, str):
        return first
    second = _read_meta(head, 1, first.page_size)
    if isinstance(second, str):
        return second
    if second.page_size != first.page_size:
        return "the meta pages disagree on the page size"
    newest = max(first, second, key=lambda m: m.txnid)
    if size < (newest.last_page + 1) * newest.page_size:
        return (f"data.mdb is truncated: {size} bytes, its meta page uses "
                f"{(newest.last_page + 1) * newest.page_size}")
    return None



def file_problem(path: Path, walk: bool = False) -> str | None:
    """Why the index at `path` must not be opened, or None: its meta pages and size always;
    with `walk`, a full read of a non-empty file too (the daemon and `verify` walk)."""
    data_file = path / "data.mdb"
    return data_file_problem(data_file) or (
        walk and data_file.exists() and data_file.stat().st_size > 0 and walk_problem(path)) or None



_early_walks: dict[str, subprocess.Popen] = {}  # index path -> its walk, started by start_walk
_early_lock = threading.Lock()


def start_walk(path: Path) -> None:
    """Start the full read walk of the index at `path` now, for the next Index(walk=True)
    of it to take: the daemon starts it before loading its model, so a large index is
    checked while the model loads rather than after (start-up then waits for neither)."""
    if not os.path.isfile(Path(path) / "data.mdb"):
        return  # nothing to check: a new cache, or one this user cannot read (the disk tier says why)
    with _early_lock:
        if os.path.abspath(path) in _early_walks:
            return
        try:
            _early_walks[os.path.abspath(path)] = _spawn_walk(Path(path))
        except OSError as exc:
            log.warning("could not start checking the index %s: %s", path, exc)


def _spawn_walk(path: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-m", "kvtier.index_file", str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def walk_problem(path: Path, timeout: float = 600) -> str | None:
    """Read every record of the index in a child process (`python -m kvtier.index_file PATH`):
    a bad page makes LMDB raise, but it can also abort or fault, which must not take the
    daemon down. None when the walk found nothing wrong (or could not tell). Takes the
    walk `start_walk` began, if any."""
    with _early_lock:
        early = _early_walks.pop(os.path.abspath(path), None)
    try:
        child = early or _spawn_walk(path)
    except OSError as exc:
        log.warning("could not check the index %s: %s", path, exc)
        return None
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        log.warning("could not check the index %s: no answer in %.0f s", path, timeout)
        return None
    if child.returncode < 0:
        return f"LMDB crashed reading it (signal {-child.returncode})"
    if child.returncode == _WALK_DAMAGED:
        return stdout.strip() or "damaged"
    if child.returncode != 0:
        log.warning("could not check the index %s: %s", path, (stderr or stdout).strip()[-500:])
    return None


_WALK_DAMAGED = 3


def _walk(path: Path) -> str | None:
    """Every page of every database, through LMDB's own checks, plus the shape of our keys:
    strictly increasing, of their fixed length, as many as each database counts. A database
    not ours (a newer kvtier's) gets LMDB's checks alone: the schema version then decides."""
    env = lmdb.open(str(path), map_size=MAP_SIZE, max_dbs=128, readonly=True, lock=True, subdir=True)
    try:
        with env.begin() as txn:
            names = [bytes(k) for k, _ in txn.cursor()]
        for name in [None, *names]:
            db = env.open_db(name, create=False) if name else None  # a name of no database raises
            with env.begin(db=db) as txn:
                problem = _walk_db(name or b"main", txn, txn.stat(db)["entries"])
            if problem:
                return problem
    finally:
        env.close()
    _probe_free_pages(path)  # damage there raises
    return None


def _probe_free_pages(path: Path) -> None:
    """LMDB's list of free pages is no database a reader can walk: a write transaction,
    aborted, makes LMDB read the head of it (where the next pages come from)."""
    env = lmdb.open(str(path), map_size=MAP_SIZE, max_dbs=len(DB_NAMES), lock=True, subdir=True)
    try:
        with env.begin(write=True) as txn:
            txn.put(b"walk:probe", b"")
            txn.abort()
    finally:
        env.close()


def _walk_db(name: bytes, txn: lmdb.Transaction[bytes], entries: int) -> str | None:
    previous, count, length = None, 0, KEY_LENGTHS.get(name)
    for key, value in txn.cursor():
        if previous is not None and key <= previous:
            return f"{name.decode()}: keys out of order"
        if length and len(key) != length:
            return f"{name.decode()}: a key of {len(key)} bytes"
        if (name in (b"lru", b"heads") and value) or (name == b"children" and value[:1] not in (b"k", b"s")):
            return f"{name.decode()}: a value of the wrong form"
        previous, count = key, count + 1
    return None if count == entries else f"{name.decode()}: {count} entries, LMDB counts {entries}"


def in_use(path: Path) -> bool:
    """Whether another process has the index open: LMDB holds a lock on the first byte of
    lock.mdb in every process using it. Only ask with the index closed in this process
    (closing any descriptor of the file drops this process's locks on it)."""
    import fcntl

    try:
        fd = os.open(path / "lock.mdb", os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, 0)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def set_aside(path: Path, problem: IndexDamaged) -> str:
    """Clear `path` for a fresh index and say, in one log line, why and where the old one went:
    a damaged index is kept (`move_aside`); one of another schema version is deleted, as the
    rebuild takes everything it needs from the block files. Returns where it went."""
    aside = move_aside(path, "outdated" if isinstance(problem, IndexOutdated) else "damaged")
    if isinstance(problem, IndexOutdated):
        shutil.rmtree(aside, ignore_errors=True)  # renamed first: a crash here leaves no half index
        log.warning("%s: removed; a fresh index is rebuilt from the block files", problem)
        return "removed"
    log.error("%s: moved to %s; a fresh index is rebuilt from the block files", problem, aside)
    return f"moved to {aside.name}"


def move_aside(path: Path, why: str = "damaged") -> Path:
    """Rename a damaged index directory to `<name>.<why>-<time>`, removing older such copies
    first so they do not pile up."""
    for old in path.parent.glob(f"{path.name}.{why}-*"):
        shutil.rmtree(old, ignore_errors=True)
    aside = path.with_name(f"{path.name}.{why}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.rename(path, aside)
    return aside


if __name__ == "__main__":  # the child process of walk_problem
    try:
        found = _walk(Path(sys.argv[1]))
    except DAMAGE_ERRORS as exc:
        found = f"{type(exc).__name__}: {exc}"
    if found:
        print(found)
        sys.exit(_WALK_DAMAGED)
