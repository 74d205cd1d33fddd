"""The LMDB index of the cold tier: one record per block file, an LRU order, and totals.

LMDB is safe across processes, so the CLI can read and purge while the daemon runs.
The index is a cache of what the block files hold (kvtier/reindex.py rebuilds it from
them): a damaged file is detected before use (kvtier/index_file.py checks it), reads as a
miss at run time, and is moved aside for a fresh one (`IndexDamaged`, `Index.reset`).
Sub-databases:
  blocks  key(16 B)                      -> JSON record (see BlockRecord)
  lru     access_ms(8 B BE) + inverted depth(4 B) + key(16 B)  -> b""   (oldest first = evicted first)
  children parent(16 B) + key(16 B)      -> kind (1 B: k or s) + the child's tokens (uint32 LE)
  heads   parent(16 B) + kind(1 B) + first token (4 B BE) + key(16 B) -> b""
          the children again, by their first token: a tail match reads only the children
          that can share tokens with the prompt, however many siblings there are
  models  fingerprint                    -> JSON description
  meta    b"bytes" / b"count"            -> totals kept in the same transactions
          b"allocated"                   -> total allocated bytes (absent in an index made
                                            before it existed, until `recount`)
          b"counters:" + fingerprint     -> JSON request counters, so stats survive restarts
          b"totals:" + fingerprint       -> JSON {blocks, snapshots, bytes, pinned_bytes} of a
                                            model's records, kept in the same transactions
                                            (`kvtier stats` without reading every record)
          b"per_model"                   -> present while those are kept (absent in an index
                                            made before them, until `recount`)
          b"heads"                       -> present while `heads` lists every child (absent in
                                            an index made before it, until `fill_heads`)
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import lmdb

from .index_file import DAMAGE_ERRORS, DB_NAMES, MAP_SIZE, IndexDamaged, file_problem, in_use, move_aside

log = logging.getLogger("kvtier.index")

REBUILD_KEY = b"rebuild"  # in meta: set while the index is being refilled from the files
PER_MODEL_KEY, MODEL_TOTALS_PREFIX, HEADS_KEY = b"per_model", b"totals:", b"heads"
MODEL_TOTAL_FIELDS = ("blocks", "snapshots", "bytes", "pinned_bytes")


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
    pinned: bool = False
    kind: str = "kv"  # or "snap": a snapshot of the non-sliceable layers at a boundary
    allocated: int = 0  # bytes the filesystem allocates for the file (st_blocks * 512)

    def __post_init__(self) -> None:
        if not self.allocated:  # a record written before this field existed
            self.allocated = allocated_estimate(self.nbytes)

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


def add_to_model_totals(totals: dict[str, dict[str, int]], record: "BlockRecord", sign: int = 1) -> None:
    """Count `record` into (or, with sign -1, out of) its model's totals."""
    entry = totals.setdefault(record.fingerprint, dict.fromkeys(MODEL_TOTAL_FIELDS, 0))
    entry["snapshots" if record.kind == "snap" else "blocks"] += sign
    entry["bytes"] += sign * record.nbytes
    entry["pinned_bytes"] += sign * record.nbytes if record.pinned else 0


def _head_key(parent: bytes, kind: bytes, tokens: bytes, key: bytes) -> bytes | None:
    """Where a child sits in `heads` (None for one without tokens: nothing to match on)."""
    if len(tokens) < 4:
        return None
    return parent + kind[:1] + int.from_bytes(tokens[:4], "little").to_bytes(4, "big") + key


def _json_or_none(raw: bytes | None):
    try:
        return json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        return None


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


def _reads(empty: Callable[[], object]):
    """A read that meets an index it cannot read returns `empty()`: a miss, never an error."""
    def wrap(method):
        @functools.wraps(method)
        def guarded(self: "Index", *args, **kwargs):
            generation = self._generation
            try:
                return method(self, *args, **kwargs)
            except lmdb.Error as exc:
                self._failed(exc, generation)
                return empty()
        return guarded
    return wrap


def _writes(method):
    """A write that meets a damaged index raises IndexDamaged (an lmdb.Error, so callers
    treat it like any failed disk write) after reporting the damage."""
    @functools.wraps(method)
    def guarded(self: "Index", *args, **kwargs):
        generation = self._generation
        try:
            return method(self, *args, **kwargs)
        except DAMAGE_ERRORS as exc:
            self._failed(exc, generation)
            raise IndexDamaged(f"{self.path}: {type(exc).__name__}: {exc}") from exc
    return guarded


def _int(raw: bytes | None) -> int:
    try:
        return int(raw or 0)
    except ValueError:
        return 0


def open_or_replace(path: Path) -> "Index":
    """The index at `path`, fully checked; a damaged one is moved aside and replaced by an
    empty one marked for a rebuild from the block files (the caller runs it). One another
    process still uses is left alone: IndexDamaged."""
    try:
        return Index(path, walk=True)
    except IndexDamaged as exc:
        if in_use(path):
            raise
        reason = str(exc)
    aside = move_aside(path)
    log.error("%s: moved to %s; a fresh index is rebuilt from the block files", reason, aside)
    index = Index(path)
    index.mark_rebuild(reason)
    return index


class Index:
    """Raises IndexDamaged when the file fails its checks: the meta pages and size always,
    and with `walk` a full read in a child process (the daemon and `verify` walk)."""

    def __init__(self, path: Path, readonly: bool = False, walk: bool = False):
        self.path, self._readonly = path, readonly
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if problem := file_problem(path, walk):
            raise IndexDamaged(f"{path}: {problem}")
        self.damage: str | None = None  # set when damage is met at run time
        self.on_damage: Callable[[str], None] | None = None  # the daemon recovers here
        self._generation = 0  # bumped by reset: late errors from the old file are ignored
        self._reset_lock = threading.RLock()
        self._registered: dict[str, dict] = {}  # models this process registered, kept over a reset
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
        except BaseException:
            env.close()
            raise
        self._blocks, self._lru, self._children, self._models, self._meta, self._heads = dbs
        self.env = env

    def close(self) -> None:
        self.env.close()

    # -- damage --------------------------------------------------------------------------
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
            # Deleted under us (with the cache directory, maybe): made again (LocalDisk._remake).
            aside = move_aside(self.path) if self.path.exists() else self.path
            self.path.mkdir(mode=0o700)
            self._open()
            self._generation += 1
            self.damage = None
            self.mark_rebuild(reason)
            for fingerprint, description in self._registered.items():
                self.register_model(fingerprint, description)
        if aside != self.path:
            log.warning("the damaged index was moved to %s; a fresh one is rebuilt from the block files", aside)
        return aside

    @_reads(lambda: None)
    def rebuild_pending(self) -> str | None:
        """Why the index is being refilled from the block files, if it is."""
        with self.env.begin(db=self._meta) as txn:
            raw = txn.get(REBUILD_KEY)
        return None if raw is None else bytes(raw).decode(errors="replace")

    @_writes
    def mark_rebuild(self, reason: str | None) -> None:
        with self.env.begin(write=True, db=self._meta) as txn:
            if reason is None:
                txn.delete(REBUILD_KEY)
            else:
                txn.put(REBUILD_KEY, reason.encode())

    # -- reads -------------------------------------------------------------------------
    @_reads(lambda: None)
    def get(self, key: bytes) -> BlockRecord | None:
        with self.env.begin(db=self._blocks) as txn:
            raw = txn.get(key)
        return BlockRecord.decode_or_none(raw)

    @_reads(dict)
    def get_many(self, keys: list[bytes]) -> dict[bytes, BlockRecord]:
        """The records of those keys the index holds, read in one transaction."""
        found = {}
        with self.env.begin(db=self._blocks) as txn:
            for key in keys:
                record = BlockRecord.decode_or_none(txn.get(key))
                if record is not None:
                    found[key] = record
        return found

    @_reads(lambda: (0, 0))
    def totals(self) -> tuple[int, int]:
        """(bytes, blocks) of every indexed file."""
        with self.env.begin(db=self._meta) as txn:
            return (_int(txn.get(b"bytes")), _int(txn.get(b"count")))

    @_reads(lambda: None)
    def allocated(self) -> int | None:
        """Bytes the filesystem allocates for every indexed file; None until an index from
        before this total (or with an unreadable one) has been recounted."""
        with self.env.begin(db=self._meta) as txn:
            raw = txn.get(b"allocated")
        return None if raw is None or not bytes(raw).isdigit() else int(raw)

    @_reads(lambda: None)
    def model_totals(self) -> dict[str, dict[str, int]] | None:
        """Blocks, snapshots, bytes and pinned bytes per model fingerprint, as kept with every
        write; None for an index from before these totals, until its recount."""
        with self.env.begin(db=self._meta) as txn:
            if txn.get(PER_MODEL_KEY) is None:
                return None
            cursor, found = txn.cursor(), {}
            if cursor.set_range(MODEL_TOTALS_PREFIX):
                for key, value in cursor:
                    if not bytes(key).startswith(MODEL_TOTALS_PREFIX):
                        break
                    if isinstance(entry := _json_or_none(value), dict):
                        found[bytes(key)[len(MODEL_TOTALS_PREFIX):].decode(errors="replace")] = entry
            return found

    def has_many(self, keys: list[bytes]) -> set[bytes]:
        """Those of `keys` that have a record (readable or not). Not under `_reads` on purpose:
        an unreadable index must stop the caller (the leftover sweep), not answer "none", which
        would make every block file look like a leftover."""
        with self.env.begin(db=self._blocks) as txn:
            return {key for key in keys if txn.get(key) is not None}

    def items(self) -> Iterator[tuple[bytes, BlockRecord | None]]:
        """Every (key, record); None for a record that cannot be decoded. Raises
        IndexDamaged when the walk meets a damaged page (a partial list is not the list)."""
        generation = self._generation
        try:
            with self.env.begin(db=self._blocks) as txn:
                for key, raw in txn.cursor():
                    yield bytes(key), BlockRecord.decode_or_none(raw)
        except DAMAGE_ERRORS as exc:
            self._failed(exc, generation)
            raise IndexDamaged(f"{self.path}: {type(exc).__name__}: {exc}") from exc

    def newest(self) -> Iterator[tuple[bytes, BlockRecord]]:
        """(key, record) of every entry, most recently used first, read lazily from the LRU
        order (one read transaction for the whole walk: stop early for a page of them)."""
        generation = self._generation
        try:
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
        except DAMAGE_ERRORS as exc:
            self._failed(exc, generation)
            raise IndexDamaged(f"{self.path}: {type(exc).__name__}: {exc}") from exc

    @_reads(list)
    def children(self, parent: bytes, kind: str = "kv", first: int | None = None) -> list[tuple[bytes, bytes]]:
        """(key, token bytes) of every indexed entry of `kind` whose parent is `parent`; with
        `first`, only those whose first token it is (read by it, from `heads`)."""
        if first is not None:
            with self.env.begin() as txn:
                if txn.get(HEADS_KEY, db=self._meta) is not None:
                    return self._children_by_head(txn, parent, kind, first)
            return [(k, t) for k, t in self.children(parent, kind) if t[:4] == int(first).to_bytes(4, "little")]
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

    @_reads(dict)
    def models(self) -> dict[str, dict]:
        with self.env.begin(db=self._models) as txn:
            return {bytes(k).decode(errors="replace"): value for k, v in txn.cursor()
                    if isinstance(value := _json_or_none(v), dict)}

    @_reads(list)
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
    @_writes
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
                self._add_totals(txn, record, 1)

    @_writes
    def add_counters(self, fingerprint: str, deltas: dict[str, int]) -> None:
        with self.env.begin(write=True, db=self._meta) as txn:
            key = b"counters:" + fingerprint.encode()
            counters = _json_or_none(txn.get(key))
            counters = counters if isinstance(counters, dict) else {}
            for name, value in deltas.items():
                counters[name] = counters.get(name, 0) + value
            txn.put(key, json.dumps(counters).encode())

    @_reads(dict)
    def counters(self) -> dict[str, dict[str, int]]:
        """Persisted request counters per model fingerprint."""
        out = {}
        with self.env.begin(db=self._meta) as txn:
            for key, value in txn.cursor():
                if bytes(key).startswith(b"counters:") and isinstance(found := _json_or_none(value), dict):
                    out[bytes(key)[9:].decode(errors="replace")] = found
        return out

    @_writes
    def recount(self) -> tuple[int, int]:
        """Recompute the totals from the records (after a repair); returns (bytes, blocks)."""
        with self.env.begin(write=True) as txn:
            total = count = allocated = 0
            per_model: dict[str, dict[str, int]] = {}
            for _, raw in txn.cursor(db=self._blocks):
                try:
                    record = BlockRecord.decode(raw)
                except (ValueError, TypeError):
                    continue
                total, count, allocated = total + record.nbytes, count + 1, allocated + record.allocated
                add_to_model_totals(per_model, record)
            txn.put(b"bytes", str(total).encode(), db=self._meta)
            txn.put(b"count", str(count).encode(), db=self._meta)
            txn.put(b"allocated", str(allocated).encode(), db=self._meta)
            stale = [bytes(k) for k, _ in txn.cursor(db=self._meta) if bytes(k).startswith(MODEL_TOTALS_PREFIX)]
            for key in stale:
                txn.delete(key, db=self._meta)
            for fingerprint, entry in per_model.items():
                txn.put(MODEL_TOTALS_PREFIX + fingerprint.encode(), json.dumps(entry).encode(), db=self._meta)
            txn.put(PER_MODEL_KEY, b"1", db=self._meta)
        return total, count

    @_reads(lambda: True)  # nothing to fill in an unreadable index: it is replaced, then rebuilt
    def heads_kept(self) -> bool:
        with self.env.begin(db=self._meta) as txn:
            return txn.get(HEADS_KEY) is not None

    @_writes
    def fill_heads(self) -> int:
        """List every child in `heads` (an index from before it): one pass, once."""
        with self.env.begin(write=True) as txn:
            count = 0
            for child, tokens in txn.cursor(db=self._children):
                child, tokens = bytes(child), bytes(tokens)
                if (head := _head_key(child[:16], tokens[:1], tokens[1:], child[16:])) is not None:
                    txn.put(head, b"", db=self._heads)
                    count += 1
            txn.put(HEADS_KEY, b"1", db=self._meta)
        return count

    @_writes
    def register_model(self, fingerprint: str, description: dict) -> None:
        self._registered[fingerprint] = description
        with self.env.begin(write=True, db=self._models) as txn:
            txn.put(fingerprint.encode(), json.dumps(description).encode())

    @_writes
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

    @_writes
    def set_pinned(self, keys: list[bytes], pinned: bool) -> int:
        changed = 0
        with self.env.begin(write=True) as txn:
            for key in keys:
                record = BlockRecord.decode_or_none(txn.get(key, db=self._blocks))
                if record:
                    self._add_model_totals(txn, record, -1)
                    record.pinned = pinned
                    self._add_model_totals(txn, record, 1)
                    txn.put(key, record.encode(), db=self._blocks)
                    changed += 1
        return changed

    @_writes
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

    @_writes
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
        self._add_totals(txn, record, -1)

    def _add_totals(self, txn: lmdb.Transaction[bytes], record: BlockRecord, sign: int) -> None:
        """Count a record into (sign 1) or out of (-1) the totals, overall and per model."""
        old_count = _int(txn.get(b"count", db=self._meta))
        total = _int(txn.get(b"bytes", db=self._meta)) + sign * record.nbytes
        txn.put(b"bytes", str(max(total, 0)).encode(), db=self._meta)
        txn.put(b"count", str(max(old_count + sign, 0)).encode(), db=self._meta)
        old_allocated = txn.get(b"allocated", db=self._meta)
        if old_allocated is not None or old_count == 0:  # else it waits for a recount
            new_allocated = int(old_allocated or 0) + sign * record.allocated
            txn.put(b"allocated", str(max(new_allocated, 0)).encode(), db=self._meta)
        if old_count == 0 and sign > 0 and txn.get(PER_MODEL_KEY, db=self._meta) is None:
            txn.put(PER_MODEL_KEY, b"1", db=self._meta)  # an empty index: kept from here on
            txn.put(HEADS_KEY, b"1", db=self._meta)
        self._add_model_totals(txn, record, sign)

    def _add_model_totals(self, txn: lmdb.Transaction[bytes], record: BlockRecord, sign: int) -> None:
        if txn.get(PER_MODEL_KEY, db=self._meta) is None:
            return  # an index from before the per-model totals: they wait for a recount
        key = MODEL_TOTALS_PREFIX + record.fingerprint.encode()
        entry = _json_or_none(txn.get(key, db=self._meta))
        totals = {record.fingerprint: entry} if isinstance(entry, dict) else {}
        add_to_model_totals(totals, record, sign)
        if any(totals[record.fingerprint].values()):
            txn.put(key, json.dumps(totals[record.fingerprint]).encode(), db=self._meta)
        else:  # the model's last record went
            txn.delete(key, db=self._meta)

    def disk_usage(self) -> int:
        """Bytes the index files themselves occupy on disk (LMDB files are sparse)."""
        path = Path(self.env.path())
        try:
            return sum(p.stat().st_blocks * 512 for p in path.iterdir() if p.is_file())
        except FileNotFoundError:  # deleted under a running daemon, until it makes it again
            return 0
