"""The LMDB index of the cold tier: one record per block file, an LRU order, and totals.

LMDB is safe across processes, so the CLI can read and purge while the daemon runs.
Sub-databases:
  blocks  key(16 B)                      -> JSON record (see BlockRecord)
  lru     access_ms(8 B BE) + inverted depth(4 B) + key(16 B)  -> b""   (oldest first = evicted first)
  children parent(16 B) + key(16 B)      -> kind (1 B: k or s) + the child's tokens (uint32 LE)
  models  fingerprint                    -> JSON description
  meta    b"bytes" / b"count"            -> totals kept in the same transactions
          b"allocated"                   -> total allocated bytes (absent in an index made
                                            before it existed, until `recount`)
          b"counters:" + fingerprint     -> JSON request counters, so stats survive restarts
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import lmdb

MAP_SIZE = 4 << 30  # LMDB's address-space reservation, not disk use


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


class Index:
    def __init__(self, path: Path, readonly: bool = False):
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.env = lmdb.open(str(path), map_size=MAP_SIZE, max_dbs=5, readonly=readonly,
                             lock=True, subdir=True, mode=0o600)
        self._blocks = self.env.open_db(b"blocks", create=not readonly)
        self._lru = self.env.open_db(b"lru", create=not readonly)
        self._children = self.env.open_db(b"children", create=not readonly)
        self._models = self.env.open_db(b"models", create=not readonly)
        self._meta = self.env.open_db(b"meta", create=not readonly)

    def close(self) -> None:
        self.env.close()

    # -- reads -------------------------------------------------------------------------
    def get(self, key: bytes) -> BlockRecord | None:
        with self.env.begin(db=self._blocks) as txn:
            raw = txn.get(key)
        return BlockRecord.decode_or_none(raw)

    def get_many(self, keys: list[bytes]) -> dict[bytes, BlockRecord]:
        """The records of those keys the index holds, read in one transaction."""
        found = {}
        with self.env.begin(db=self._blocks) as txn:
            for key in keys:
                record = BlockRecord.decode_or_none(txn.get(key))
                if record is not None:
                    found[key] = record
        return found

    def totals(self) -> tuple[int, int]:
        """(bytes, blocks) of every indexed file."""
        with self.env.begin(db=self._meta) as txn:
            return (int(txn.get(b"bytes") or 0), int(txn.get(b"count") or 0))

    def allocated(self) -> int | None:
        """Bytes the filesystem allocates for every indexed file; None until an index from
        before this total has been recounted."""
        with self.env.begin(db=self._meta) as txn:
            raw = txn.get(b"allocated")
        return None if raw is None else int(raw)

    def has_many(self, keys: list[bytes]) -> set[bytes]:
        """Those of `keys` that have a record (readable or not)."""
        with self.env.begin(db=self._blocks) as txn:
            return {key for key in keys if txn.get(key) is not None}

    def items(self) -> Iterator[tuple[bytes, BlockRecord | None]]:
        """Every (key, record); None for a record that cannot be decoded."""
        with self.env.begin(db=self._blocks) as txn:
            for key, raw in txn.cursor():
                try:
                    yield bytes(key), BlockRecord.decode(raw)
                except (ValueError, TypeError):
                    yield bytes(key), None

    def children(self, parent: bytes, kind: str = "kv") -> list[tuple[bytes, bytes]]:
        """(key, token bytes) of every indexed entry of `kind` whose parent is `parent`."""
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

    def models(self) -> dict[str, dict]:
        with self.env.begin(db=self._models) as txn:
            return {k.decode(): json.loads(v) for k, v in txn.cursor()}

    def oldest(self, limit: int) -> list[bytes]:
        """Keys of up to `limit` unpinned blocks, least recently used first."""
        keys = []
        with self.env.begin() as txn:
            for lru_key, _ in txn.cursor(db=self._lru):
                key = bytes(lru_key[12:])
                record = BlockRecord.decode_or_none(txn.get(key, db=self._blocks))
                if record and not record.pinned:
                    keys.append(key)
                if len(keys) >= limit:
                    break
        return keys

    # -- writes ------------------------------------------------------------------------
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
                self._add_totals(txn, record.nbytes, 1, record.allocated)

    def add_counters(self, fingerprint: str, deltas: dict[str, int]) -> None:
        with self.env.begin(write=True, db=self._meta) as txn:
            key = b"counters:" + fingerprint.encode()
            counters = json.loads(txn.get(key) or b"{}")
            for name, value in deltas.items():
                counters[name] = counters.get(name, 0) + value
            txn.put(key, json.dumps(counters).encode())

    def counters(self) -> dict[str, dict[str, int]]:
        """Persisted request counters per model fingerprint."""
        out = {}
        with self.env.begin(db=self._meta) as txn:
            for key, value in txn.cursor():
                if bytes(key).startswith(b"counters:"):
                    out[bytes(key)[9:].decode()] = json.loads(value)
        return out

    def recount(self) -> tuple[int, int]:
        """Recompute the totals from the records (after a repair); returns (bytes, blocks)."""
        with self.env.begin(write=True) as txn:
            total = count = allocated = 0
            for _, raw in txn.cursor(db=self._blocks):
                try:
                    record = BlockRecord.decode(raw)
                except (ValueError, TypeError):
                    continue
                total, count, allocated = total + record.nbytes, count + 1, allocated + record.allocated
            txn.put(b"bytes", str(total).encode(), db=self._meta)
            txn.put(b"count", str(count).encode(), db=self._meta)
            txn.put(b"allocated", str(allocated).encode(), db=self._meta)
        return total, count

    def register_model(self, fingerprint: str, description: dict) -> None:
        with self.env.begin(write=True, db=self._models) as txn:
            txn.put(fingerprint.encode(), json.dumps(description).encode())

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

    def set_pinned(self, keys: list[bytes], pinned: bool) -> int:
        changed = 0
        with self.env.begin(write=True) as txn:
            for key in keys:
                record = BlockRecord.decode_or_none(txn.get(key, db=self._blocks))
                if record:
                    record.pinned = pinned
                    txn.put(key, record.encode(), db=self._blocks)
                    changed += 1
        return changed

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

    def _drop(self, txn: lmdb.Transaction, key: bytes, record: BlockRecord) -> None:
        txn.delete(key, db=self._blocks)
        txn.delete(_lru_key(record, key), db=self._lru)
        txn.delete(bytes.fromhex(record.parent) + key, db=self._children)
        self._add_totals(txn, -record.nbytes, -1, -record.allocated)

    def _add_totals(self, txn: lmdb.Transaction, nbytes: int, count: int, allocated: int) -> None:
        old_count = int(txn.get(b"count", db=self._meta) or 0)
        total = int(txn.get(b"bytes", db=self._meta) or 0) + nbytes
        txn.put(b"bytes", str(max(total, 0)).encode(), db=self._meta)
        txn.put(b"count", str(max(old_count + count, 0)).encode(), db=self._meta)
        old_allocated = txn.get(b"allocated", db=self._meta)
        if old_allocated is not None or old_count == 0:  # else it waits for a recount
            new_allocated = int(old_allocated or 0) + allocated
            txn.put(b"allocated", str(max(new_allocated, 0)).encode(), db=self._meta)

    def disk_usage(self) -> int:
        """Bytes the index files themselves occupy on disk (LMDB files are sparse)."""
        path = Path(self.env.path())
        return sum(p.stat().st_blocks * 512 for p in path.iterdir() if p.is_file())
