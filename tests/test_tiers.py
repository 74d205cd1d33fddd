"""The tiers on a real directory: real LMDB, real safetensors files, real MLX arrays."""

from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager

import mlx.core as mx
import numpy as np
import pytest

from kvtier.blocks import block_refs
from kvtier.config import CacheConfig
from kvtier.disk import decode_block, encode_block
from kvtier.ram import HotBlock, RamTier
from kvtier.tiers import NewEntry, TieredStore

BLOCK = 16
LAYOUT = {f"{i}.{kv}.0": ((1, 2, 1, 8), "float32") for i in range(2) for kv in ("keys", "values")}
BLOCK_BYTES = 4 * 2 * 8 * BLOCK * 4  # four arrays of (1, 2, 16, 8) float32


def make_store(cache_dir, **overrides) -> TieredStore:
    config = CacheConfig(cache_dir=cache_dir, block_size=BLOCK, **overrides)
    return TieredStore(config, "fp-test", LAYOUT)


def arrays_for(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {name: mx.array(rng.standard_normal((1, 2, BLOCK, 8)).astype(np.float32)) for name in LAYOUT}


def fill(store: TieredStore, tokens: list[int]) -> list:
    refs = block_refs(tokens, BLOCK, store.fingerprint)
    store.store([NewEntry(ref, tokens[ref.index * BLOCK:(ref.index + 1) * BLOCK], arrays_for(ref.index))
                 for ref in refs])
    return refs


def dir_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files
               if "index" not in d)


def test_blocks_survive_a_restart_bit_for_bit(tmp_path):
    tokens = list(range(100, 100 + 4 * BLOCK + 5))
    store = make_store(tmp_path)
    refs = fill(store, tokens)
    store.close()

    store = make_store(tmp_path)
    match = store.match(refs, tokens)
    assert match.sources == ["disk"] * 4
    for hit in match.hits:
        for name, array in arrays_for(hit.ref.index).items():
            assert np.array_equal(hit.arrays[name], np.asarray(array))
    store.promote([NewEntry(h.ref, h.tokens, arrays_for(h.ref.index)) for h in match.hits])
    assert store.match(refs, tokens).sources == ["ram"] * 4
    assert store.ram.unpersisted() == []  # their files hold them: not encoded and written again
    store.close()


def test_a_hit_is_confirmed_against_the_tokens(tmp_path):
    tokens = list(range(3 * BLOCK))
    store = make_store(tmp_path)
    refs = fill(store, tokens)
    other = tokens[:BLOCK] + [999] + tokens[BLOCK + 1:]  # same keys, different tokens: a collision
    assert store.match(refs, other).num_full_blocks == 1
    store.close()
    store = make_store(tmp_path)
    assert store.match(refs, other).num_full_blocks == 1
    assert store.counters["key_collisions"] == 1
    store.close()


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "garbage"])
def test_damaged_file_is_a_counted_miss_and_is_dropped(tmp_path, damage):
    tokens = list(range(3 * BLOCK))
    store = make_store(tmp_path)
    refs = fill(store, tokens)
    store.close()
    victim = store.files.path_for(refs[1].hex)
    data = victim.read_bytes()
    if damage == "flip":
        victim.write_bytes(data[:-10] + bytes([data[-10] ^ 0x01]) + data[-9:])
    elif damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "delete":
        victim.unlink()
    else:
        victim.write_bytes(os.urandom(len(data)))

    store = make_store(tmp_path)
    match = store.match(refs, tokens)
    assert match.num_full_blocks == 1  # the chain stops at the damaged block
    assert store.counters["damaged_blocks"] == 1
    assert store.index.get(refs[1].key) is None and not victim.exists()
    store.close()


def test_disk_budget_is_never_exceeded_and_evicts_oldest(tmp_path):
    probe = make_store(tmp_path / "probe")
    index_bytes = probe.index.disk_usage()
    probe.close()
    budget = index_bytes + 64 * 1024 + 6 * (BLOCK_BYTES + 512)  # the index and ~6 block files
    store = make_store(tmp_path / "cache", disk_budget=budget, ram_budget=BLOCK_BYTES * 2)
    chains = []
    for chain in range(12):
        tokens = [chain * 1000 + i for i in range(2 * BLOCK)]
        chains.append((fill(store, tokens), tokens))
        store.flush()
        assert store.disk_used() <= budget
    measured = dir_bytes(tmp_path / "cache") + store.index.disk_usage()
    assert measured <= budget
    assert store.counters["disk_evictions"] > 0
    newest_refs, newest_tokens = chains[-1]
    store.ram.clear()
    assert store.match(newest_refs, newest_tokens).num_full_blocks == 2
    oldest_refs, oldest_tokens = chains[0]
    assert store.match(oldest_refs, oldest_tokens).num_full_blocks == 0
    store.close()


def test_bounded_write_queue_applies_back_pressure_and_drops_nothing(tmp_path):
    store = make_store(tmp_path, write_queue_bytes=BLOCK_BYTES)
    tokens = list(range(40 * BLOCK))
    refs = block_refs(tokens, BLOCK, store.fingerprint)
    for ref in refs:  # one job per block: the producer must wait for the writer
        store.store([NewEntry(ref, tokens[ref.index * BLOCK:(ref.index + 1) * BLOCK], arrays_for(ref.index))])
    store.close()
    store = make_store(tmp_path)
    assert store.index.totals()[1] == len(refs) == 40
    store.close()


def test_unwritable_directory_keeps_serving_from_ram(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    store = make_store(tmp_path)
    os.chmod(store.files.root, 0o500)
    try:
        tokens = list(range(2 * BLOCK))
        refs = fill(store, tokens)
        store.flush()
        assert store.disk_error is not None
        assert store.match(refs, tokens).sources == ["ram", "ram"]
    finally:
        os.chmod(store.files.root, 0o700)
    store.close()


def test_bfloat16_round_trips_exactly():
    arrays = {"0.keys": mx.random.normal((1, 2, 4, 8)).astype(mx.bfloat16)}
    decoded, tokens, _ = decode_block(encode_block(arrays, np.arange(4, dtype=np.uint32), {}))
    assert decoded["0.keys"].dtype == mx.bfloat16
    assert mx.array_equal(decoded["0.keys"], arrays["0.keys"]) and tokens.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("restart", [False, True])
def test_leading_part_of_a_cached_block_is_reused(tmp_path, restart):
    tokens = list(range(500, 500 + 2 * BLOCK))
    store = make_store(tmp_path)
    fill(store, tokens)
    if restart:
        store.close()
        store = make_store(tmp_path)
    query = tokens[: BLOCK + 5] + [7, 7, 7]
    match = store.match(block_refs(query, BLOCK, store.fingerprint), query)
    assert match.num_full_blocks == 1 and match.num_tokens == BLOCK + 5
    assert match.sources == ["disk" if restart else "ram"] * 2
    store.close()


def test_a_full_block_supersedes_the_partial_tail_it_extends(tmp_path):
    tokens = list(range(900, 900 + 2 * BLOCK))
    store = make_store(tmp_path)
    short = tokens[: BLOCK + 5]
    partial_ref = block_refs(short, BLOCK, store.fingerprint, partial_tail=True)[1]
    store.store([NewEntry(block_refs(short, BLOCK, store.fingerprint)[0], short[:BLOCK], arrays_for(0)),
                 NewEntry(partial_ref, short[BLOCK:], {k: v[:, :, :5] for k, v in arrays_for(1).items()})])
    store.flush()
    assert store.index.get(partial_ref.key) is not None
    fill(store, tokens)  # the conversation went on: block 1 is now full
    store.flush()
    assert store.index.get(partial_ref.key) is None and store.ram.get(partial_ref.key) is None
    assert not store.files.path_for(partial_ref.hex).exists()
    assert store.index.totals()[1] == 2
    store.close()


def test_unusable_cache_directory_serves_from_ram_and_says_why(tmp_path):
    """A cache path that cannot be a directory (a file stands where it should be) must not
    stop the store: RAM only, nothing written, the reason in the stats."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("in the way")
    store = make_store(blocker / "cache")
    tokens = list(range(3 * BLOCK))
    refs = fill(store, tokens)
    store.flush()
    assert store.match(refs, tokens).sources == ["ram"] * 3
    stats = store.stats()["disk"]
    assert stats["writable"] is False and "NotADirectoryError" in stats["error"]
    assert stats["blocks"] == 0 and blocker.read_text() == "in the way"
    scratch = store._scratch
    store.close()
    assert scratch is not None and not scratch.exists()  # the temporary index is gone too


def test_read_ahead_stays_within_its_window_and_keeps_chain_order(tmp_path):
    """Files are read in chain order, never more than the window ahead of the block in use,
    and a chain that breaks leaves nothing more to read."""
    from concurrent.futures import ThreadPoolExecutor

    from kvtier.index import BlockRecord
    from kvtier.tiers import ReadAhead

    class CountingPool(ThreadPoolExecutor):
        submitted: list = []

        def submit(self, fn, *args):
            self.submitted.append(args[0])
            return super().submit(fn, *args)

    refs = block_refs(list(range(12 * BLOCK)), BLOCK, "fp-test")
    record = BlockRecord(parent="", fingerprint="fp-test", depth=0, num_tokens=BLOCK, nbytes=1000,
                         checksum="", tokens_hash="", access_ms=0, created_ms=0)
    with CountingPool(2) as pool:
        reads = ReadAhead(pool, lambda key_hex, _: key_hex, [(ref, record) for ref in refs], window_bytes=3000)
        assert len(pool.submitted) == 3  # three 1000-byte files fill the window
        for ref in refs[:6]:
            assert reads.take(ref.key)[1].result() == ref.hex
            assert len(pool.submitted) == ref.index + 1 + 3
        reads.cancel()
        assert reads.take(refs[6].key) is None
    assert pool.submitted == [ref.hex for ref in refs[:9]]


@contextmanager
def index_writes_stalled(store: TieredStore):
    """Another writer holds the index's write lock (as `kvtier purge` or `pin` from another
    process may): the disk writer writes its files, then waits to commit, its job queued."""
    locked, release = threading.Event(), threading.Event()

    def hold_lock():
        with store.index.env.begin(write=True):
            locked.set()
            release.wait()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    locked.wait()
    try:
        yield
    finally:
        release.set()
        holder.join()


def test_ram_never_evicts_a_block_held_for_its_write():
    ram = RamTier(budget=100)
    a, b = (HotBlock(bytes([i]) * 16, b"\0" * 16, i, np.zeros(1, np.uint32), {}, nbytes=100) for i in range(2))
    ram.hold([a, b])
    assert ram.put(a) == [] and ram.put(b) == [] and ram.shrink_to(0) == []
    assert ram.usage() == {"blocks": 2, "bytes": 200, "budget": 100,  # over budget, and says so
                           "pending_blocks": 2, "pending_bytes": 200}
    assert ram.written([a]) == [a]  # written: back within budget, oldest first
    assert ram.usage()["pending_bytes"] == 100 and ram.get(b.key) is b
    assert ram.written([b]) == [] and ram.usage()["pending_bytes"] == 0


def test_blocks_waiting_for_their_write_are_found_in_ram(tmp_path):
    """Over a tight RAM budget, a request's blocks stay in RAM until their files are indexed:
    the next lookup finds every one while the write is provably still queued, memory
    pressure cannot drop them either, the stats show the overshoot, and once written RAM
    is back within budget with the rest found on disk."""
    store = make_store(tmp_path, ram_budget=2 * BLOCK_BYTES)
    tokens = list(range(6 * BLOCK))
    with index_writes_stalled(store):
        refs = fill(store, tokens)
        assert store.writer.pending[0] == 1 and store.index.get_many([r.key for r in refs]) == {}
        assert store.match(refs, tokens).sources == ["ram"] * 6
        diverging = tokens[: 2 * BLOCK + 5] + [7]  # the leading part of a held block, too
        assert store.match(block_refs(diverging, BLOCK, store.fingerprint), diverging).num_tokens == 2 * BLOCK + 5
        assert store.spill(0) == 0 and store.match(refs, tokens).num_full_blocks == 6
        ram = store.stats()["ram"]
        assert ram["pending_blocks"] == 6 and ram["pending_bytes"] == ram["bytes"] == 6 * BLOCK_BYTES
    store.flush()
    ram = store.stats()["ram"]
    assert ram["pending_bytes"] == 0 and ram["bytes"] <= 2 * BLOCK_BYTES
    match = store.match(refs, tokens)
    assert match.num_full_blocks == 6 and match.sources[0] == "disk"
    assert store.counters["ram_evictions_unwritten"] == 0
    store.close()


@pytest.mark.parametrize("disk", ["off", "failing"])
def test_evicting_a_block_no_tier_holds_is_counted_and_logged(tmp_path, caplog, disk):
    """With the disk tier off, or its writes failing, a block RAM evicts is gone: never
    silently. The ones RAM still holds are written once the disk accepts writes again."""
    caplog.set_level(logging.DEBUG, logger="kvtier.tiers")
    store = make_store(tmp_path, ram_budget=2 * BLOCK_BYTES, **({"disk_budget": 0} if disk == "off" else {}))
    if disk == "failing":  # a file where the block directory was: every write fails
        store.files.root.rmdir()
        store.files.root.write_text("in the way")
    tokens = list(range(5 * BLOCK))
    refs = fill(store, tokens)
    store.flush()
    assert store.counters["ram_evictions_unwritten"] == 3
    assert any("dropped" in r.getMessage() for r in caplog.records if r.name == "kvtier.tiers")
    assert store.ram.num_bytes == 2 * BLOCK_BYTES
    if disk == "failing":
        store.files.root.unlink()
        store.files.root.mkdir()
        store.flush()  # the two still in RAM are retried
        assert set(store.index.get_many([r.key for r in refs])) == {r.key for r in refs[3:]}
    store.close()
