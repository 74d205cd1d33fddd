"""The tiers on a real directory: real LMDB, real safetensors files, real MLX arrays."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from contextlib import contextmanager

import mlx.core as mx
import numpy as np
import pytest

from kvtier.blocks import block_refs
from kvtier.disk import decode_block, encode_block
from kvtier.kvstate import PromptBuffers
from kvtier.local import LocalDisk
from kvtier.ram import HotBlock, RamTier
from kvtier.tiers import NewEntry, TieredStore
from kvtier.writer import WriteJob
from tests.support.blocks import (
    BLOCK,
    BLOCK_BYTES,
    LAYOUT,
    arrays_for,
    as_an_older_kvtier_left_it,
    assert_buffers_hold_blocks,
    assert_hits_hold_their_arrays,
    fill,
    make_store,
)


def du(path) -> int:
    """What the filesystem allocates under `path`, directories included, as `du` counts it."""
    return os.lstat(path).st_blocks * 512 + sum(
        os.lstat(os.path.join(d, name)).st_blocks * 512 for d, dirs, files in os.walk(path) for name in dirs + files)


def test_blocks_survive_a_restart_bit_for_bit(tmp_path):
    tokens = list(range(100, 100 + 4 * BLOCK + 5))
    store = make_store(tmp_path)
    refs = fill(store, tokens)
    store.close()

    store = make_store(tmp_path)
    match = store.match(refs, tokens)
    assert match.sources == ["disk"] * 4
    assert_hits_hold_their_arrays(match.hits)
    store.promote([NewEntry(h.ref, h.tokens, arrays_for(h.ref.index)) for h in match.hits])
    assert store.match(refs, tokens).sources == ["ram"] * 4
    assert store.ram.unpersisted() == []  # their files hold them: not encoded and written again
    store.close()


def test_files_read_straight_into_a_prompts_buffers_hold_the_blocks_bit_for_bit(tmp_path):
    """A restore reads each block file into the prompt's buffers at its place, with RAM
    blocks copied between them: the buffers end up holding every block exactly."""
    tokens = list(range(100, 100 + 6 * BLOCK + 5))
    store = make_store(tmp_path)
    refs = fill(store, tokens)
    store.close()
    store = make_store(tmp_path)
    # Blocks 0 and 3 hot (copied into the buffers), the others read in place.
    store.promote([NewEntry(refs[i], tokens[i * BLOCK:(i + 1) * BLOCK], arrays_for(i)) for i in (0, 3)])
    buffers = PromptBuffers(LAYOUT, capacity=len(tokens) + 1)
    match = store.match(refs, tokens, into=buffers)
    assert match.sources == ["ram", "disk", "disk", "ram", "disk", "disk"]
    assert buffers.num_tokens == 6 * BLOCK
    assert_buffers_hold_blocks(buffers, 6)
    store.close()


def test_a_hit_is_confirmed_against_the_tokens(tmp_path):
    tokens = list(range(3 * BLOCK))
    store = make_store(tmp_path)
    refs = fill(store, tokens)
    other = tokens[:BLOCK] + [999] + tokens[BLOCK + 1:]  # same keys, different tokens: a collision
    assert store.match(refs, other).num_full_blocks(BLOCK) == 1
    store.close()
    store = make_store(tmp_path)
    assert store.match(refs, other).num_full_blocks(BLOCK) == 1
    assert store.counters["key_collisions"] == 1
    store.close()


@pytest.mark.parametrize("into_buffers", [False, True], ids=["parsed", "in-place"])
@pytest.mark.parametrize("damage", ["flip", "flip-tensor", "truncate", "delete", "garbage"])
def test_damaged_file_is_a_counted_miss_and_is_dropped(tmp_path, damage, into_buffers):
    tokens = list(range(3 * BLOCK))
    store = make_store(tmp_path)
    refs = fill(store, tokens)
    store.close()
    victim = store.files.path_for(refs[1].hex)
    data = victim.read_bytes()
    if damage == "flip":
        victim.write_bytes(data[:-10] + bytes([data[-10] ^ 0x01]) + data[-9:])
    elif damage == "flip-tensor":  # a KV value's bit, which no header or token check sees
        middle = len(data) // 2
        victim.write_bytes(data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1:])
    elif damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "delete":
        victim.unlink()
    else:
        victim.write_bytes(os.urandom(len(data)))

    store = make_store(tmp_path)
    buffers = PromptBuffers(LAYOUT, capacity=len(tokens) + 1) if into_buffers else None
    match = store.match(refs, tokens, into=buffers)
    assert match.num_full_blocks(BLOCK) == 1  # the chain stops at the damaged block
    if buffers is not None:
        assert buffers.num_tokens == BLOCK  # the damaged block's bytes were read, never held
        assert_buffers_hold_blocks(buffers, 1)
    assert store.counters["damaged_blocks"] == 1
    assert store.index.get(refs[1].key) is None and not victim.exists()
    store.close()


def test_disk_budget_is_never_exceeded_and_evicts_oldest(tmp_path):
    """The budget holds for what the filesystem allocates (whole blocks per file, the
    directories, the index), not just the files' sizes: a small file takes a 4 KiB block."""
    probe = make_store(tmp_path / "probe")
    for chain in range(3):
        fill(probe, [chain * 1000 + i for i in range(2 * BLOCK)])
    probe.close()
    budget = du(tmp_path / "probe") + 4096  # room for about three chains
    store = make_store(tmp_path / "cache", disk_budget=budget, ram_budget=BLOCK_BYTES * 2)
    chains = []
    for chain in range(12):
        tokens = [chain * 1000 + i for i in range(2 * BLOCK)]
        chains.append((fill(store, tokens), tokens))
        store.flush()
        assert du(tmp_path / "cache") <= budget
        assert store.disk_used() == du(tmp_path / "cache")  # the accounting is exact
    assert store.counters["disk_evictions"] > 0
    newest_refs, newest_tokens = chains[-1]
    store.ram.clear()
    assert store.match(newest_refs, newest_tokens).num_full_blocks(BLOCK) == 2
    oldest_refs, oldest_tokens = chains[0]
    assert store.match(oldest_refs, oldest_tokens).num_full_blocks(BLOCK) == 0
    store.close()


def test_eviction_takes_just_the_oldest_needed_in_one_index_transaction(tmp_path):
    """Evicting many entries (purge --to-size, a full budget) removes the same ones as one
    at a time would, least recently used first and no more than needed, but in one LMDB
    write transaction (one commit and sync) rather than one per entry."""
    store = make_store(tmp_path)
    for chain in range(10):
        fill(store, [chain * 1000 + i for i in range(3 * BLOCK)])
        store.flush()
    store.close()
    with LocalDisk.existing(tmp_path) as disk:
        lru = disk.index.oldest(100)
        per_entry = disk.index.get(lru[0]).allocated
        target = disk.disk_used() - 12 * per_entry - 1  # a byte more than 12 entries free
        transactions = disk.index.env.info()["last_txnid"]
        removed = disk.evict_to(target)
        # 13, or 14 when the index file grew a page with the eviction's own transaction.
        assert removed in (13, 14)
        assert disk.index.env.info()["last_txnid"] - transactions <= removed - 12  # one commit per round
        assert disk.index.oldest(100) == lru[removed:]
        assert disk.disk_used() <= target
        assert sorted(p.name for p in (tmp_path / "blocks").rglob("*.safetensors")) == \
            sorted(f"{k.hex()}.safetensors" for k in lru[removed:])


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
    assert match.num_full_blocks(BLOCK) == 1 and match.num_tokens == BLOCK + 5
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
    scratch = store.disk.scratch
    store.close()
    assert scratch is not None and not scratch.exists()  # the temporary index is gone too


def test_read_ahead_stays_within_its_window_and_keeps_chain_order(tmp_path):
    """Files are read in chain order, never more than the window ahead of the block in use,
    and a chain that breaks leaves nothing more to read."""
    from concurrent.futures import ThreadPoolExecutor

    from kvtier.index import BlockRecord
    from kvtier.readahead import ReadAhead

    class CountingPool(ThreadPoolExecutor):
        submitted: list = []

        def submit(self, fn, /, *args, **kwargs):
            self.submitted.append(args[0])
            return super().submit(fn, *args, **kwargs)

    refs = block_refs(list(range(12 * BLOCK)), BLOCK, "fp-test")
    record = BlockRecord(parent="", fingerprint="fp-test", depth=0, num_tokens=BLOCK, nbytes=1000,
                         checksum="", tokens_hash="", access_ms=0, created_ms=0, allocated=4096)
    with CountingPool(2) as pool:
        reads = ReadAhead(pool, lambda key_hex, _: key_hex, [(ref, record) for ref in refs], window_bytes=3000)
        assert len(pool.submitted) == 3  # three 1000-byte files fill the window
        for ref in refs[:6]:
            taken = reads.take(ref.key)
            assert taken is not None and taken[1].result() == ref.hex
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
        assert store.spill(0) == 0 and store.match(refs, tokens).num_full_blocks(BLOCK) == 6
        ram = store.stats()["ram"]
        assert ram["pending_blocks"] == 6 and ram["pending_bytes"] == ram["bytes"] == 6 * BLOCK_BYTES
    store.flush()
    ram = store.stats()["ram"]
    assert ram["pending_bytes"] == 0 and ram["bytes"] <= 2 * BLOCK_BYTES
    match = store.match(refs, tokens)
    assert match.num_full_blocks(BLOCK) == 6 and match.sources[0] == "disk"
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
def long_chain(store: TieredStore, chain: int, blocks: int = 32) -> tuple[list, list[int]]:
    tokens = [chain * 10_000 + i for i in range(blocks * BLOCK)]
    refs = fill(store, tokens)
    store.flush()
    return refs, tokens


def test_full_disk_evicts_to_what_it_holds_says_so_steadily_and_resumes(tmpfs):
    """A 4 MB filesystem under a 1 GB budget: the cache fills the disk, then evicts to make
    room (the newest prefixes stay on disk), says "disk full" from then on without flipping,
    and grows again by itself once the filesystem is larger."""
    point = tmpfs("4m")
    store = make_store(point / "cache", disk_budget=10**9, ram_budget=BLOCK_BYTES * 4)
    reports = []
    for chain in range(24):  # ~6 MB of block files
        refs, tokens = long_chain(store, chain)
        reports.append(store.disk_error)
    first_full = next(i for i, error in enumerate(reports) if error is not None)
    assert all(error is not None and error.startswith("disk full") for error in reports[first_full:]), reports
    assert store.counters["disk_evictions"] > 0
    store.ram.clear()
    assert store.match(refs, tokens).num_full_blocks(BLOCK) == 32  # the newest prefix is on disk
    assert store.stats()["disk"]["full"] is True

    subprocess.run(["mount", "-o", "remount,size=64m", str(point)], check=True)
    assert store.disk_error is None  # no write needed to notice
    evictions = store.counters["disk_evictions"]
    blocks_before = store.index.totals()[1]
    long_chain(store, 100)
    assert store.counters["disk_evictions"] == evictions and store.index.totals()[1] == blocks_before + 32
    store.close()


def test_removed_block_directory_is_made_again(tmp_path):
    store = make_store(tmp_path)
    long_chain(store, 1, blocks=2)
    shutil.rmtree(store.files.root)
    refs, tokens = long_chain(store, 2, blocks=2)
    assert store.disk_error is None and store.counters["disk_write_errors"] == 0
    store.close()
    store = make_store(tmp_path)
    assert store.match(refs, tokens).sources == ["disk", "disk"]
    assert oct(store.files.root.stat().st_mode & 0o777) == "0o700"
    store.close()


def test_leftovers_of_a_killed_daemon_are_swept_at_start_up(tmp_path):
    """Temp files and block files the index does not hold (a kill -9 between the file and
    the index commit) are removed after start-up, from a listing, leaving indexed ones."""
    store = make_store(tmp_path)
    refs, tokens = long_chain(store, 1, blocks=3)
    store.close()
    kept = store.files.path_for(refs[0].hex)
    orphan = store.files.path_for("ab" * 16)
    orphan.parent.mkdir(exist_ok=True)
    shutil.copy(kept, orphan)
    temp = kept.parent / f".{refs[0].hex}.1234abcd.tmp"
    temp.write_bytes(b"half a block")
    old = time.time() - 5
    for path in (orphan, temp):
        os.utime(path, (old, old))

    store = make_store(tmp_path)
    assert store.swept.wait(30)
    assert not orphan.exists() and not temp.exists()
    assert store.match(refs, tokens).sources == ["disk"] * 3
    store.close()


def test_an_existing_cache_directory_open_to_others_is_made_private(tmp_path):
    cache = tmp_path / "cache"
    (cache / "blocks").mkdir(parents=True)
    os.chmod(cache, 0o755)
    os.chmod(cache / "blocks", 0o755)
    store = make_store(cache)
    assert store.disk_error is None
    assert cache.stat().st_mode & 0o777 == 0o700 and (cache / "blocks").stat().st_mode & 0o777 == 0o700
    store.close()


def test_a_shared_directory_is_refused_not_changed(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "notes.txt").write_text("someone else's")
    os.chmod(shared, 0o755)
    store = make_store(shared)
    assert "open to other users" in (store.disk_error or "") and not store.disk_enabled
    assert shared.stat().st_mode & 0o777 == 0o755 and not (shared / "index").exists()
    store.close()


def test_an_index_from_before_schema_versions_is_rebuilt_and_its_entries_found(tmp_path):
    """An older kvtier's index (records without `allocated`, no allocated total) is not read
    but rebuilt from the block files: every entry is found again, restored bit for bit, and
    the budget counts what the filesystem really allocates for the files."""
    store = make_store(tmp_path)
    refs, tokens = long_chain(store, 1, blocks=3)
    store.close()
    as_an_older_kvtier_left_it(tmp_path / "index")

    store = make_store(tmp_path)
    assert store.disk.rebuilder.wait(30) and store.counters["index_rebuilds"] == 1
    match = store.match(refs, tokens)
    assert match.sources == ["disk"] * len(refs)
    assert_hits_hold_their_arrays(match.hits)
    files = [store.files.path_for(ref.hex) for ref in refs]
    assert store.index.allocated() == sum(path.stat().st_blocks * 512 for path in files)
    assert store.counters["damaged_blocks"] == 0
    store.close()
    assert not list(tmp_path.glob("index.*"))  # the old index is not kept: the files hold all of it


def test_read_only_blocks_fail_visibly_count_what_they_keep_and_recover(tmp_path):
    """Under a read-only bind mount, a write that must evict first removes the record but
    cannot remove the file: the failure is reported (not hidden by the cleanup's own error),
    the file stays counted in the budget, and once writable the report clears by itself and
    the file goes."""
    store = make_store(tmp_path / "cache")
    long_chain(store, 1, blocks=12)
    store.close()
    for byte in range(256):  # a well-used cache: the new blocks' subdirectories are there
        (store.files.root / f"{byte:02x}").mkdir(exist_ok=True)
    store = make_store(tmp_path / "cache", disk_budget=du(tmp_path / "cache") + 16384)  # a chain must evict
    blocks = store.files.root
    if subprocess.run(["mount", "--bind", str(blocks), str(blocks)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(blocks)], check=True)
        refs, tokens = long_chain(store, 2, blocks=3)
        assert "Read-only" in (store.disk_error or "") and store.counters["disk_write_errors"] > 0
        assert store.disk_used() == du(tmp_path / "cache")  # the evicted file is still counted
        assert store.match(refs, tokens).sources == ["ram"] * 3
    finally:
        subprocess.run(["umount", str(blocks)], check=True)
    deadline = time.time() + 30
    while store.disk_error is not None and time.time() < deadline:
        time.sleep(0.1)  # the disk is retried every few seconds
    assert store.disk_error is None
    store.flush()  # what failed is written now
    assert store.disk_used() == du(tmp_path / "cache") <= store.config.disk_budget
    assert len(list(store.files.iter_files())) == store.index.totals()[1]  # no stray file left
    store.ram.clear()
    assert store.match(refs, tokens).sources == ["disk"] * 3
    store.close()


def test_a_request_is_counted_in_the_index_by_keep_not_before_its_first_token(tmp_path):
    # An LMDB commit (an fsync) on the MLX thread is per-request overhead: restore counts in
    # memory, keep (after the answer) queues the index's counters for the writer thread.
    store = make_store(tmp_path)
    restored = store.restore(list(range(3 * BLOCK)), into=PromptBuffers(LAYOUT, 3 * BLOCK + 1))
    assert store.counters["requests_miss"] == 1
    assert store.index.counters().get("fp-test", {}).get("requests_miss", 0) == 0
    writer_busy = threading.Event()

    def hold_the_writer() -> None:
        writer_busy.wait()

    store.wait_for_writes()
    store.writer.submit(WriteJob([], note=hold_the_writer))
    store.keep(restored, [], sequence=None, snapshots={})
    assert store.index.counters().get("fp-test", {}).get("requests_miss", 0) == 0  # not on this thread
    writer_busy.set()
    store.flush()
    assert store.index.counters()["fp-test"]["requests_miss"] == 1
    store.keep(restored, [], sequence=None, snapshots={})  # counted once, however often kept
    store.flush()
    assert store.index.counters()["fp-test"]["requests_miss"] == 1
    store.close()
