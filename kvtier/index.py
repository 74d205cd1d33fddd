"""The LMDB index of the cold tier: one record per block file, an LRU order, and totals.

LMDB is safe across processes, so the CLI can read and purge while the daemon runs.
The index is a cache of what the block files hold (kvtier/reindex.py rebuilds it from
them): a damaged file is detected before use (kvtier/index_file.py checks it), reads as a
miss at run time, and is moved aside for a fresh one (kvtier/index_guard.py).
Sub-databases:
  blocks  key(16 B)                      -> JSON record (see BlockRecord)
  lru     access_ms(8 B BE) + inverted depth(4 B) + key(16 B)  -> b""   (oldest first = evicted first)
  children parent(16 B) + key(16 B)      -> kind (1 B: k or s) + the child's tokens (uint32 LE)
  heads   parent(16 B) + kind(1 B) + first token (4 B BE) + key(16 B) -> b""
          the children again, by their first token: a tail match reads only the children
          that can share tokens with the prompt, however many siblings there are
  models  fingerprint                    -> JSON description
  meta    b"schema"                      -> SCHEMA_VERSION, written into a new index
          b"rebuild"                     -> why the index is being refilled from the files
          totals and request counters    -> kvtier/index_totals.py
An index of another schema version (none: an older kvtier's) is never read or converted in
place: it raises IndexOutdated, a kind of IndexDamaged, so it is replaced and rebuilt from
the block files like a damaged one. Change SCHEMA_VERSION with any change of the tables.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import lmdb

from . import index_totals
from .index_file import DAMAGE_ERRORS, DB_NAMES, MAP_SIZE, IndexDamaged, IndexOutdated, file_problem, in_use, set_aside
from .index_guard import Guarded, must_read, reads, walks, writes
from .index_totals import json_or_none

REBUILD_KEY = b"rebuild"  # in meta: set while the index is being refilled from the files
SCHEMA_KEY, SCHEMA_VERSION = b"schema", 1  # in meta; an index without it is from before versions


@dataclass
class BlockRecord:
    parent: str  # hex key of the previous block (or the chain root)
    fingerprint: str  # model fingerprint the block belongs to
    depth: int  # index of the block in its chain
    num_tokens: int
    nbytes: int  # file size (what a read must find)
    checksum: str  # xxh3-128 of the whole file
    tokens_hash: str  # xxh64 of the tokens: an independent check of a key match
    access_ms: int
    created_ms: int
    allocated: int  # bytes the filesystem allocates for the file (st_blocks * 512)
    pinned: bool = False
    kind: str = "kv"  # or "snap": a snapshot of the non-sliceable layers at a boundary

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "BlockRecord":
        return cls(**json.loads(raw))

    @classmethod
    def decode_or_none(cls, raw: bytes | None) -> "BlockRecord | None":
        """None for a missing or unreadable record: garbage in the index is a miss."""
        if not raw:
            return None
        try:
            return cls.decode(raw)
        except (ValueError, TypeError):
            return None


def _head_key(parent: bytes, kind: bytes, tokens: bytes, key: bytes) -> bytes | None:
    """Where a child sits in `heads` (None for one without tokens: nothing to match on)."""
    if len(tokens) < 4:
        return None
    return parent + kind[:1] + int.from_bytes(tokens[:4], "little").to_bytes(4, "big") + key


def allocated_estimate(nbytes: int, block: int = 4096) -> int:
    """What a file of `nbytes` most likely occupies: whole filesystem blocks."""
    return -(-nbytes // block) * block


def now_ms() -> int:
    return int(time.time() * 1000)


def _lru_key(record: "BlockRecord", key: bytes) -> bytes:
    # Among blocks touched in the same millisecond, deeper ones sort first, so a chain is
    # evicted from its tail and its shared head survives longest.
    return (record.access_ms.to_bytes(8, "big")
            + (0xFFFFFFFF - min(record.depth, 0xFFFFFFFF)).to_bytes(4, "big") + key)


def open_or_replace(path: Path) -> "Index":
    """The index at `path`, fully checked; a damaged one, or one of another schema version,
    is set aside and replaced by an empty one marked for a rebuild from the block files (the
    caller runs it). One another process still uses is left alone: IndexDamaged."""
    try:
        return Index(path, walk=True)
    except IndexDamaged as exc:
        if in_use(path):
            raise
        problem = exc
    set_aside(path, problem)
    index = Index(path)
    index.mark_rebuild(str(problem))
    return index


def _schema_problem(env: lmdb.Environment, dbs: list, meta, readonly: bool) -> str | None:
    """Why this kvtier must not read the index (None: it may); a new, empty one gets the
    current SCHEMA_VERSION."""
    with env.begin(db=meta) as txn:
        found = txn.get(SCHEMA_KEY)
        empty = found is None and all(txn.stat(db)["entries"] == 0 for db in dbs)
    if empty:
        if not readonly:
            with env.begin(write=True, db=meta) as txn:
                txn.put(SCHEMA_KEY, str(SCHEMA_VERSION).encode())
        return None
    if found == str(SCHEMA_VERSION).encode():
        return None
    shown = "none (an older kvtier's)" if found is None else bytes(found).decode(errors="replace")[:20]
    return f"index schema version {shown}, this kvtier uses {SCHEMA_VERSION}"


class Index(Guarded):
    """Raises IndexDamaged when the file fails its checks: the meta pages and size always,
    and with `walk` a full read in a child process (the daemon and `verify` walk); damage met
    later is handled as kvtier/index_guard.py says."""

    def __init__(self, path: Path, readonly: bool = False, walk: bool = False):
        super().__init__(path)
        self._readonly = readonly
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if problem := file_problem(path, walk):
            raise IndexDamaged(f"{path}: {problem}")
        self._registered: dict[str, dict] = {}  # models this process registered, kept over a reset
        self._written: dict[str, dict] = {}  # of those, what is in this index file now
        try:
            self._open()
        except DAMAGE_ERRORS as exc:
            raise IndexDamaged(f"{path}: {type(exc).__name__}: {exc}") from exc

    def _open(self) -> None:
        create = not self._readonly
        env = lmdb.open(str(self.path), map_size=MAP_SIZE, max_dbs=len(DB_NAMES),
                        readonly=self._readonly, lock=True, subdir=True, mode=0o600)
        try:
            dbs = [env.open_db(name, create=create) for name in DB_NAMES]
            self._blocks, self._lru, self._children, self._models, self._meta, self._heads = dbs
            problem = _schema_problem(env, dbs, self._meta, self._readonly)
        except BaseException:
            env.close()
            raise
        if problem is not None:
            env.close()
            raise IndexOutdated(f"{self.path}: {problem}")
        self.env = env

    def close(self) -> None:
        self.env.close()

    def _reopened(self, reason: str) -> None:
        self.mark_rebuild(reason)
        self._written.clear()  # a fresh file: every model is described again
        for fingerprint, description in self._registered.items():
            self.register_model(fingerprint, description)

    # -- the rebuild mark ----------------------------------------------------------------
    @reads(lambda: None)
    def rebuild_pending(self) -> str | None:
        """Why the index is being refilled from the block files, if it is."""
        with self.env.begin(db=self._meta) as txn:
            raw = txn.get(REBUILD_KEY)
        return None if raw is None else bytes(raw).decode(errors="replace")

    @writes
    def mark_rebuild(self, reason: str | None) -> None:
        with self.env.begin(write=True, db=self._meta) as txn:
            if reason is None:
                txn.delete(REBUILD_KEY)
            else:
                txn.put(REBUILD_KEY, reason.encode())

    # -- reads -------------------------------------------------------------------------
    @reads(lambda: None)
    def get(self, key: bytes) -> BlockRecord | None:
        with self.env.begin(db=self._blocks) as txn:
            raw = txn.get(key)
        return BlockRecord.decode_or_none(raw)

    @reads(dict)
    def get_many(self, keys: list[bytes]) -> dict[bytes, BlockRecord]:
        """The records of those keys the index holds, read in one transaction."""
        found = {}
        with self.env.begin(db=self._blocks) as txn:
            for key in keys:
                record = BlockRecord.decode_or_none(txn.get(key))
                if record is not None:
                    found[key] = record
        return found

    @reads(lambda: (0, 0))
    def totals(self) -> tuple[int, int]:
        """(bytes, blocks) of every indexed file."""
        with self.env.begin() as txn:
            return index_totals.overall(txn, self._meta)[:2]

    @reads(int)
    def allocated(self) -> int:
        """Bytes the filesystem allocates for every indexed file."""
        with self.env.begin() as txn:
            return index_totals.overall(txn, self._meta)[2]

    @reads(dict)
    def model_totals(self) -> dict[str, dict[str, int]]:
        """Blocks, snapshots, bytes and pinned bytes per model fingerprint, as kept with every write."""
        with self.env.begin() as txn:
            return index_totals.per_model(txn, self._meta)

    @must_read
    def has_many(self, keys: list[bytes]) -> set[bytes]:
        """Those of `keys` that have a record (readable or not). Not a `reads` on purpose: an
        unreadable index must stop the caller (the leftover sweep), not answer "none", which
        would make every block file look like a leftover."""
        with self.env.begin(db=self._blocks) as txn:
            return {key for key in keys if txn.get(key) is not None}

    @walks
    def items(self) -> Iterator[tuple[bytes, BlockRecord | None]]:
        """Every (key, record); None for a record that cannot be decoded."""
        with self.env.begin(db=self._blocks) as txn:
            for key, raw in txn.cursor():
                yield bytes(key), BlockRecord.decode_or_none(raw)

    @walks
    def newest(self) -> Iterator[tuple[bytes, BlockRecord]]:
        """(key, record) of every entry, most recently used first, read lazily from the LRU
        order (one read transaction for the whole walk: stop early for a page of them)."""
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self._lru)
            if not cursor.last():
                return
            while True:
                key = bytes(cursor.key()[12:])
                record = BlockRecord.decode_or_none(txn.get(key, db=self._blocks))
                if record is not None:
                    yield key, record
                if not cursor.prev():
                    return

    @reads(list)
    def children(self, parent: bytes, kind: str = "kv", first: int | None = None) -> list[tuple[bytes, bytes]]:
        """(key, token bytes) of every indexed entry of `kind` whose parent is `parent`; with
        `first`, only those whose first token it is (read by it, from `heads`)."""
        if first is not None:
            with self.env.begin() as txn:
                return self._children_by_head(txn, parent, kind, first)
        with self.env.begin(db=self._children) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(parent):
                return []
            found = []
            for composite, tokens in cursor:
                if composite[:16] != parent:
                    break
                if tokens[:1] == kind[:1].encode():
                    found.append((bytes(composite[16:]), bytes(tokens[1:])))
            return found

    def _children_by_head(self, txn: lmdb.Transaction[bytes], parent: bytes, kind: str,
                          first: int) -> list[tuple[bytes, bytes]]:
        start = parent + kind[:1].encode() + int(first).to_bytes(4, "big")
        cursor, found = txn.cursor(db=self._heads), []
        if not cursor.set_range(start):
            return []
        for head, _ in cursor:
            if head[:21] != start:
                break
            key = bytes(head[21:])
            tokens = txn.get(parent + key, db=self._children)
            if tokens is not None:
                found.append((key, bytes(tokens[1:])))
        return found

    @reads(dict)
    def models(self) -> dict[str, dict]:
        with self.env.begin(db=self._models) as txn:
            return {bytes(k).decode(errors="replace"): value for k, v in txn.cursor()
                    if isinstance(value := json_or_none(v), dict)}

    @reads(list)
    def oldest(self, limit: int, covering: int | None = None) -> list[bytes]:
        """Keys of up to `limit` unpinned blocks, least recently used first; with `covering`,
        only as many as it takes for their allocated bytes to reach it."""
        keys, allocated = [], 0
        with self.env.begin() as txn:
            for lru_key, _ in txn.cursor(db=self._lru):
                key = bytes(lru_key[12:])
                record = BlockRecord.decode_or_none(txn.get(key, db=self._blocks))
                if record and not record.pinned:
                    keys.append(key)
                    allocated += record.allocated
                if len(keys) >= limit or (covering is not None and allocated >= covering):
                    break
        return keys

    # -- writes ------------------------------------------------------------------------
    @writes
    def put_many(self, entries: list[tuple[bytes, BlockRecord, bytes]]) -> None:
        """Index (key, record, tokens) entries in one transaction: all or none."""
        with self.env.begin(write=True) as txn:
            for key, record, tokens in entries:
                old = BlockRecord.decode_or_none(txn.get(key, db=self._blocks))
                if old:
                    self._drop(txn, key, old)
                txn.put(key, record.encode(), db=self._blocks)
                txn.put(_lru_key(record, key), b"", db=self._lru)
                txn.put(bytes.fromhex(record.parent) + key, record.kind[:1].encode() + tokens,
                        db=self._children)
                if (head := _head_key(bytes.fromhex(record.parent), record.kind.encode(), tokens, key)) is not None:
                    txn.put(head, b"", db=self._heads)
                index_totals.add(txn, self._meta, record, 1)

    @writes
    def add_counters(self, fingerprint: str, deltas: dict[str, int]) -> None:
        with self.env.begin(write=True) as txn:
            index_totals.add_counters(txn, self._meta, fingerprint, deltas)

    @reads(dict)
    def counters(self) -> dict[str, dict[str, int]]:
        """Persisted request counters per model fingerprint."""
        with self.env.begin() as txn:
            return index_totals.counters(txn, self._meta)

    @writes
    def recount(self) -> tuple[int, int]:
        """Recompute the totals from the records (after a repair); returns (bytes, blocks)."""
        with self.env.begin(write=True) as txn:
            records = (BlockRecord.decode_or_none(raw) for _, raw in txn.cursor(db=self._blocks))
            return index_totals.recount(txn, self._meta, [r for r in records if r is not None])

    @writes
    def register_model(self, fingerprint: str, description: dict) -> None:
        """Describe the model in the index, unless this process wrote just that (a reload)."""
        if self._written.get(fingerprint) == description:
            return
        self._registered[fingerprint] = description
        with self.env.begin(write=True, db=self._models) as txn:
            txn.put(fingerprint.encode(), json.dumps(description).encode())
        self._written[fingerprint] = description

    @writes
    def touch(self, keys: list[bytes], access_ms: int) -> None:
        with self.env.begin(write=True) as txn:
            for key in keys:
                record = BlockRecord.decode_or_none(txn.get(key, db=self._blocks))
                if record is None:
                    continue
                txn.delete(_lru_key(record, key), db=self._lru)
                record.access_ms = access_ms
                txn.put(key, record.encode(), db=self._blocks)
                txn.put(_lru_key(record, key), b"", db=self._lru)

    @writes
    def set_pinned(self, keys: list[bytes], pinned: bool) -> int:
        changed = 0
        with self.env.begin(write=True) as txn:
            for key in keys:
                record = BlockRecord.decode_or_none(txn.get(key, db=self._blocks))
                if record:
                    index_totals.add_per_model(txn, self._meta, record, -1)
                    record.pinned = pinned
                    index_totals.add_per_model(txn, self._meta, record, 1)
                    txn.put(key, record.encode(), db=self._blocks)
                    changed += 1
        return changed

    @writes
    def remove(self, key: bytes) -> BlockRecord | None:
        """Delete a record (the caller deletes the file afterwards)."""
        with self.env.begin(write=True) as txn:
            raw = txn.get(key, db=self._blocks)
            if raw is None:
                return None
            try:
                record = BlockRecord.decode(raw)
            except (ValueError, TypeError):
                txn.delete(key, db=self._blocks)
                return None
            self._drop(txn, key, record)
            return record

    @writes
    def remove_many(self, keys: list[bytes]) -> list[bytes]:
        """Delete the records of `keys` in one transaction (one commit, one sync: evicting
        thousands costs little more than one); returns the keys that had a readable record."""
        removed = []
        with self.env.begin(write=True) as txn:
            for key in keys:
                record = BlockRecord.decode_or_none(txn.get(key, db=self._blocks))
                if record is None:
                    txn.delete(key, db=self._blocks)  # absent, or garbage: gone either way
                    continue
                self._drop(txn, key, record)
                removed.append(key)
        return removed

    def _drop(self, txn: lmdb.Transaction[bytes], key: bytes, record: BlockRecord) -> None:
        txn.delete(key, db=self._blocks)
        txn.delete(_lru_key(record, key), db=self._lru)
        child = bytes.fromhex(record.parent) + key
        tokens = txn.get(child, db=self._children)
        if tokens is not None and (head := _head_key(child[:16], bytes(tokens[:1]), bytes(tokens[1:]), key)):
            txn.delete(head, db=self._heads)
        txn.delete(child, db=self._children)
        index_totals.add(txn, self._meta, record, -1)

    def disk_usage(self) -> int:
        """Bytes the index files themselves occupy on disk (LMDB files are sparse)."""
        path = Path(self.env.path())
        try:
            return sum(p.stat().st_blocks * 512 for p in path.iterdir() if p.is_file())
        except FileNotFoundError:  # deleted under a running daemon, until it makes it again
            return 0
