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
