"""What keeps the cache's operations cheap however many entries it holds (bench/scale.py
times them): per-model totals kept with every write, `ls` read a page at a time from the
LRU order. Real LMDB, real block files, the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np

from kvtier import ops
from kvtier.blocks import block_refs
from kvtier.config import CacheConfig
from kvtier.kvstate import Layout
from kvtier.local import LocalDisk
from kvtier.tiers import NewEntry, TieredStore
from tests.conftest import ROOT
from tests.support.blocks import decoded

BLOCK = 16
LAYOUT: Layout = {f"{i}.{kv}.0": ((1, 2, 1, 8), "float32") for i in range(2) for kv in ("keys", "values")}


def fill(store: TieredStore, tokens: list[int]) -> list:
    refs = block_refs(tokens, BLOCK, store.fingerprint)
    rng = np.random.default_rng(len(tokens))
    store.store([NewEntry(ref, tokens[ref.index * BLOCK:(ref.index + 1) * BLOCK],
                          {name: mx.array(rng.standard_normal((1, 2, BLOCK, 8)).astype(np.float32))
                           for name in LAYOUT}) for ref in refs])
    store.flush()
    return refs


def cache_with_prefixes(path, fingerprint: str = "fp-a", count: int = 7) -> list[list]:
    """`count` prefixes of 2..4 blocks, the i-th last used at i seconds (so newest is last)."""
    store = TieredStore(CacheConfig(cache_dir=path, block_size=BLOCK), fingerprint, LAYOUT)
    chains = []
    for i in range(count):
        refs = fill(store, [1000 * (i + 1) + t for t in range((2 + i % 3) * BLOCK)])
        store.index.touch([r.key for r in refs], (i + 1) * 1000)
        chains.append(refs)
    store.close()
    return chains


def test_ls_pages_through_the_prefixes_newest_first(tmp_path):
    chains = cache_with_prefixes(tmp_path)
    store = TieredStore(CacheConfig(cache_dir=tmp_path, block_size=BLOCK), "fp-a", LAYOUT)
    tokens = [1000 + t for t in range(2 * BLOCK)] + list(range(5, 5 + BLOCK))  # extends the first
    chains[0] = fill(store, tokens)
    store.index.touch([r.key for r in chains[0]], 500)  # still the oldest
    store.close()
    with LocalDisk.existing(tmp_path) as cache:
        everything = ops.prefixes(cache)
        pages = [ops.prefixes(cache, limit=3, offset=offset) for offset in (0, 3, 6)]
    assert [p.key for p in everything] == [chain[-1].hex for chain in reversed(chains)]
    assert [len(page) for page in pages] == [3, 3, 1]
    assert [p.key for page in pages for p in page] == [p.key for p in everything]
    assert [p.blocks for p in everything] == [len(chain) for chain in reversed(chains)]
    assert everything[-1].blocks == 3 and everything[-1].last_used == 0.5  # the extended chain, once
    listed = subprocess.run([sys.executable, "-m", "daemon.cli", "ls", "--cache-dir", str(tmp_path), "--json",
                             "--limit", "3", "--offset", "3"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert [p["key"] for p in json.loads(listed.stdout)] == [p.key for p in pages[1]]


def test_per_model_totals_stay_equal_to_a_walk_of_the_records(tmp_path):
    """Kept in the index's own transactions through writes, pins, removals and evictions,
    for two models in one directory."""
    cache_with_prefixes(tmp_path, "fp-a")
    cache_with_prefixes(tmp_path, "fp-b", count=4)

    def check(cache: LocalDisk) -> None:
        walked = ops.model_totals(decoded(cache.index.items()).values())
        assert cache.index.model_totals() == walked
        per_model = ops.stats(cache)["models"]
        assert {fp: {k: m[k] for k in ("blocks", "snapshots", "bytes", "pinned_bytes")}
                for fp, m in per_model.items()} == walked

    with LocalDisk.existing(tmp_path) as cache:
        assert set(cache.index.model_totals()) == {"fp-a", "fp-b"}
        check(cache)
        first = ops.prefixes(cache, limit=2)
        cache.index.set_pinned(first[0].chain, True)
        cache.index.set_pinned(first[1].chain, True)
        cache.index.set_pinned(first[1].chain, False)
        check(cache)
        assert cache.index.model_totals()[first[0].fingerprint]["pinned_bytes"] == first[0].bytes
        cache.remove_many(first[1].chain[-1:])
        ops.purge(cache, model="fp-b")  # before the eviction, which may take all of fp-b
        check(cache)
        cache.evict_to(cache.disk_used() // 2)
        check(cache)
        assert set(cache.index.model_totals()) == {"fp-a"}
        assert not ops.verify(cache)


def test_verify_reports_and_fixes_per_model_totals_that_differ(tmp_path):
    cache_with_prefixes(tmp_path, count=2)
    with LocalDisk.existing(tmp_path) as cache:
        with cache.index.env.begin(write=True, db=cache.index._meta) as txn:
            txn.put(b"totals:fp-a", json.dumps({"blocks": 1, "snapshots": 0, "bytes": 1, "pinned_bytes": 0}).encode())
        assert [p.kind for p in ops.verify(cache)] == ["totals"]
        ops.verify(cache, fix=True)
        assert not ops.verify(cache)


def test_children_are_read_by_their_first_token(tmp_path):
    """A tail match reads only the children that start with the prompt's next token (from
    the index's `heads`), however many siblings they have."""
    store = TieredStore(CacheConfig(cache_dir=tmp_path, block_size=BLOCK), "fp-a", LAYOUT)
    head = list(range(BLOCK))
    for i in range(12):  # 12 continuations of one block: 3 of them start with token 7
        fill(store, head + [7 if i % 4 == 0 else 100 + i] + [i] * (BLOCK - 1))
    parent = block_refs(head, BLOCK, "fp-a")[0].key
    store.ram.clear()
    tail = [7, 4, 9]  # starts as the continuations 0, 4 and 8 do; 4 goes on with it
    match = store.match(block_refs(head + tail, BLOCK, "fp-a"), head + tail)
    assert match.usable == [BLOCK, 2]
    store.close()

    with LocalDisk.existing(tmp_path) as cache:
        sevens = cache.index.children(parent, "kv", first=7)
        assert len(sevens) == 3 and all(np.frombuffer(t, "<u4")[0] == 7 for _, t in sevens)
        assert len(cache.index.children(parent, "kv")) == 12
        cache.remove_many([sevens[0][0]])
        assert sorted(cache.index.children(parent, "kv", first=7)) == sorted(sevens[1:])


def test_an_index_walk_started_early_is_the_one_the_open_uses(tmp_path):
    """`kvtier serve` starts the index's full check before loading the model; the store's
    open then takes that check's answer (and still finds damage with it)."""
    from kvtier import index_file as index_module

    cache_with_prefixes(tmp_path, count=2)
    index_module.start_walk(tmp_path / "index")
    early = index_module._early_walks[str(tmp_path / "index")]
    store = TieredStore(CacheConfig(cache_dir=tmp_path, block_size=BLOCK), "fp-a", LAYOUT)
    assert early.returncode == 0 and not index_module._early_walks
    assert not store.counters["index_rebuilds"]
    store.close()

    data = tmp_path / "index" / "data.mdb"
    with data.open("r+b") as f:  # random bytes over every page but the two meta pages
        rng = np.random.default_rng(1)
        for page in range(2, data.stat().st_size // 4096):
            f.seek(page * 4096)
            f.write(rng.bytes(4096))
    index_module.start_walk(tmp_path / "index")
    store = TieredStore(CacheConfig(cache_dir=tmp_path, block_size=BLOCK), "fp-a", LAYOUT)
    assert store.counters["index_rebuilds"] == 1  # moved aside, rebuilt from the files
    store.close()
