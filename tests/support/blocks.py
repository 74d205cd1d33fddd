"""Synthetic KV blocks for the tier tests: a tiny fixed layout and arrays derived from each
block's index, so a restored block is checked bit for bit without loading a model."""

from __future__ import annotations

from typing import Iterable

import mlx.core as mx
import numpy as np

from kvtier.blocks import block_refs
from kvtier.config import CacheConfig
from kvtier.index import BlockRecord
from kvtier.kvstate import Layout
from kvtier.tiers import NewEntry, TieredStore

BLOCK = 16
LAYOUT: Layout = {f"{i}.{kv}.0": ((1, 2, 1, 8), "float32") for i in range(2) for kv in ("keys", "values")}
BLOCK_BYTES = 4 * 2 * 8 * BLOCK * 4  # four arrays of (1, 2, 16, 8) float32


def decoded(items: Iterable[tuple[bytes, BlockRecord | None]]) -> dict[bytes, BlockRecord]:
    """An index's records by key (Index.items()), every one of them decodable."""
    records = {}
    for key, record in items:
        assert record is not None, f"record {key.hex()} does not decode"
        records[key] = record
    return records


def make_store(cache_dir, **overrides) -> TieredStore:
    config = CacheConfig(cache_dir=cache_dir, block_size=BLOCK, **overrides)
    return TieredStore(config, "fp-test", LAYOUT)


def arrays_for(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {name: mx.array(rng.standard_normal((1, 2, BLOCK, 8)).astype(np.float32)) for name in LAYOUT}


def fill(store: TieredStore, tokens: list[int], *, flush: bool = False) -> list:
    """Store every full block of `tokens` (block i holds arrays_for(i)); `flush` waits for
    the disk writes, which otherwise may still be queued."""
    refs = block_refs(tokens, BLOCK, store.fingerprint)
    store.store([NewEntry(ref, tokens[ref.index * BLOCK:(ref.index + 1) * BLOCK], arrays_for(ref.index))
                 for ref in refs])
    if flush:
        store.flush()
    return refs


def assert_hits_hold_their_arrays(hits) -> None:
    """Each hit carries exactly the arrays `fill` stored for its block."""
    for hit in hits:
        for name, array in arrays_for(hit.ref.index).items():
            assert np.array_equal(hit.arrays[name], np.asarray(array))


def assert_buffers_hold_blocks(buffers, num_blocks: int) -> None:
    """The prompt's buffers hold exactly the arrays `fill` stored, block after block."""
    assert buffers.num_tokens >= num_blocks * BLOCK
    views = buffers.views_at(0, num_blocks * BLOCK)
    for index in range(num_blocks):
        for name, array in arrays_for(index).items():
            assert np.array_equal(views[name][:, :, index * BLOCK:(index + 1) * BLOCK], np.asarray(array))


def as_an_older_kvtier_left_it(index_dir, schema: bytes | None = None) -> None:
    """Rewrite a closed index into the shape kvtier wrote before its schema versions (no
    version key, records without `allocated`, no allocated or per-model totals, no `heads`),
    or, with `schema`, mark it as of that version: what a newer kvtier may leave behind."""
    import json

    import lmdb

    env = lmdb.open(str(index_dir), max_dbs=8)
    blocks, meta, heads = (env.open_db(name) for name in (b"blocks", b"meta", b"heads"))
    with env.begin(write=True) as txn:
        if schema is not None:
            txn.put(b"schema", schema, db=meta)
        else:
            txn.delete(b"schema", db=meta)
            for key, raw in list(txn.cursor(db=blocks)):
                record = json.loads(raw)
                del record["allocated"]
                txn.put(key, json.dumps(record).encode(), db=blocks)
            for key in [bytes(k) for k, _ in txn.cursor(db=meta) if bytes(k).startswith(b"totals:")]:
                txn.delete(key, db=meta)
            txn.delete(b"allocated", db=meta)
            txn.drop(heads, delete=False)
    env.close()
