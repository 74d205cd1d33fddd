"""What the index counts beside its records (kvtier/index.py), kept in its `meta` table in the
same transactions as the records, so `kvtier stats` and the disk budget never walk them:

  meta  b"bytes" / b"count" / b"allocated"  -> decimal totals of every record (allocated: the
                                               bytes the filesystem allocates for the files)
        b"totals:" + fingerprint            -> JSON {blocks, snapshots, bytes, pinned_bytes}
                                               of one model's records
        b"counters:" + fingerprint          -> JSON request counters, so stats survive restarts

Each function takes the transaction it runs in and the `meta` database.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Iterable, Protocol

import lmdb

MODEL_TOTALS_PREFIX, COUNTERS_PREFIX = b"totals:", b"counters:"
MODEL_TOTAL_FIELDS = ("blocks", "snapshots", "bytes", "pinned_bytes")

if TYPE_CHECKING:
    Txn = lmdb.Transaction[bytes]  # a generic in the stubs only


class Counted(Protocol):
    """What the totals read of a record (index.BlockRecord)."""

    fingerprint: str
    kind: str
    nbytes: int
    allocated: int
    pinned: bool


def json_or_none(raw: bytes | None):
    try:
        return json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        return None


def int_of(raw: bytes | None) -> int:
    """A decimal total; 0 for a missing or garbled one (`verify --fix` recounts it)."""
    try:
        return int(raw or 0)
    except ValueError:
        return 0


def add_to_model_totals(totals: dict[str, dict[str, int]], record: Counted, sign: int = 1) -> None:
    """Count `record` into (or, with sign -1, out of) its model's entry of `totals`."""
    entry = totals.setdefault(record.fingerprint, dict.fromkeys(MODEL_TOTAL_FIELDS, 0))
    entry["snapshots" if record.kind == "snap" else "blocks"] += sign
    entry["bytes"] += sign * record.nbytes
    entry["pinned_bytes"] += sign * record.nbytes if record.pinned else 0


def add(txn: Txn, meta, record: Counted, sign: int) -> None:
    """Count a record into (sign 1) or out of (-1) the totals, overall and per model."""
    for name, amount in ((b"bytes", record.nbytes), (b"count", 1), (b"allocated", record.allocated)):
        txn.put(name, str(max(int_of(txn.get(name, db=meta)) + sign * amount, 0)).encode(), db=meta)
    add_per_model(txn, meta, record, sign)


def add_per_model(txn: Txn, meta, record: Counted, sign: int) -> None:
    """Count a record into or out of its model's totals alone (a pin changes only those)."""
    key = MODEL_TOTALS_PREFIX + record.fingerprint.encode()
    entry = json_or_none(txn.get(key, db=meta))
    totals = {record.fingerprint: entry} if isinstance(entry, dict) else {}
    add_to_model_totals(totals, record, sign)
    if any(totals[record.fingerprint].values()):
        txn.put(key, json.dumps(totals[record.fingerprint]).encode(), db=meta)
    else:  # the model's last record went
        txn.delete(key, db=meta)


def overall(txn: Txn, meta) -> tuple[int, int, int]:
    """(bytes, count, allocated bytes) of every record."""
    nbytes, count, allocated = (int_of(txn.get(name, db=meta)) for name in (b"bytes", b"count", b"allocated"))
    return nbytes, count, allocated


def _under(txn: Txn, meta, prefix: bytes) -> list[tuple[bytes, bytes]]:
    cursor, found = txn.cursor(db=meta), []
    if cursor.set_range(prefix):
        for key, value in cursor:
            if not bytes(key).startswith(prefix):
                break
            found.append((bytes(key), bytes(value)))
    return found


def _prefixed(txn: Txn, meta, prefix: bytes) -> dict[str, dict]:
    """The JSON objects under `prefix`, by the rest of their key (a fingerprint)."""
    return {key[len(prefix):].decode(errors="replace"): entry for key, value in _under(txn, meta, prefix)
            if isinstance(entry := json_or_none(value), dict)}


def per_model(txn: Txn, meta) -> dict[str, dict[str, int]]:
    """Blocks, snapshots, bytes and pinned bytes per model fingerprint."""
    return _prefixed(txn, meta, MODEL_TOTALS_PREFIX)


def recount(txn: Txn, meta, records: Iterable[Counted]) -> tuple[int, int]:
    """Replace every total by a count of `records` (a repair); returns (bytes, count)."""
    total = count = allocated = 0
    models: dict[str, dict[str, int]] = {}
    for record in records:
        total, count, allocated = total + record.nbytes, count + 1, allocated + record.allocated
        add_to_model_totals(models, record)
    for name, value in ((b"bytes", total), (b"count", count), (b"allocated", allocated)):
        txn.put(name, str(value).encode(), db=meta)
    for key, _ in _under(txn, meta, MODEL_TOTALS_PREFIX):
        txn.delete(key, db=meta)
    for fingerprint, entry in models.items():
        txn.put(MODEL_TOTALS_PREFIX + fingerprint.encode(), json.dumps(entry).encode(), db=meta)
    return total, count


def add_counters(txn: Txn, meta, fingerprint: str, deltas: dict[str, int]) -> None:
    key = COUNTERS_PREFIX + fingerprint.encode()
    counters = json_or_none(txn.get(key, db=meta))
    counters = counters if isinstance(counters, dict) else {}
    for name, value in deltas.items():
        counters[name] = counters.get(name, 0) + value
    txn.put(key, json.dumps(counters).encode(), db=meta)


def counters(txn: Txn, meta) -> dict[str, dict[str, int]]:
    """Persisted request counters per model fingerprint."""
    return _prefixed(txn, meta, COUNTERS_PREFIX)
