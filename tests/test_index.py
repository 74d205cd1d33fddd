"""The LMDB index (kvtier/index.py): records, LRU order, children, totals and counters on a
healthy index; and a damaged one (truncated, random bytes over its pages, meta pages zeroed,
or damage met while running) is detected before LMDB maps it, moved aside and rebuilt from the
block files: the store, the CLI's verify and the daemon keep working and reuse what the files
hold."""

from __future__ import annotations

import json
import logging
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import lmdb
import numpy as np
import pytest

from kvtier import ops
from kvtier.blocks import block_refs
from kvtier.index import SCHEMA_KEY, SCHEMA_VERSION, BlockRecord, Index, open_or_replace
from kvtier.index_file import data_file_problem
from kvtier.tiers import TieredStore
from tests.conftest import ROOT, Daemon, agent_messages
from tests.support.blocks import (
    BLOCK,
    arrays_for,
    as_an_older_kvtier_left_it,
    assert_hits_hold_their_arrays,
    decoded,
    fill,
    make_store,
)

DAMAGES = ["truncate", "random_pages", "zero_meta"]
MAX_TOKENS = 8


def damage(index_dir, how: str) -> None:
    """Damage data.mdb the way a bad disk or a stray tool would."""
    data = index_dir / "data.mdb"
    size, page = data.stat().st_size, resource.getpagesize()
    if how == "truncate":
        os.truncate(data, size // 2)
        return
    with data.open("r+b") as f:
        if how == "zero_meta":
            f.write(bytes(2 * page))
        elif how == "random_pages":  # every page but the two meta pages
            rng = random.Random(3)
            for number in range(2, size // page):
                f.seek(number * page)
                f.write(rng.randbytes(page))
        elif how == "page_headers":  # pages that are neither branch nor leaf: LMDB says MDB_CORRUPTED
            for number in range(2, size // page):
                f.seek(number * page + 10)
                f.write(b"\x00\x00")


def assert_restored_exactly(store: TieredStore, refs, tokens) -> None:
    match = store.match(refs, tokens)
    assert match.sources == ["disk"] * len(refs)
    assert_hits_hold_their_arrays(match.hits)


TOKENS = list(range(500, 500 + 4 * BLOCK))


@pytest.mark.parametrize("how", DAMAGES)
def test_store_rebuilds_a_damaged_index_from_the_files(tmp_path, how):
    store = make_store(tmp_path)
    refs = fill(store, TOKENS, flush=True)
    store.close()
    damage(tmp_path / "index", how)

    store = make_store(tmp_path)  # the old code died of SIGBUS here, or raised, or went RAM-only
    assert store.disk_enabled and store.disk.rebuilder.wait(30)
    assert store.counters["index_rebuilds"] == 1
    assert_restored_exactly(store, refs, TOKENS)
    assert store.stats()["disk"]["blocks"] == len(refs)
    store.close()
    assert len(list(tmp_path.glob("index.damaged-*"))) == 1


def test_a_rebuild_cut_short_by_a_restart_resumes(tmp_path):
    store = make_store(tmp_path)
    refs = fill(store, TOKENS, flush=True)
    store.close()
    damage(tmp_path / "index", "zero_meta")
    open_or_replace(tmp_path / "index").close()  # moved aside, marked; killed before any rebuild
    store = make_store(tmp_path)
    assert store.disk.rebuilder.wait(30)
    assert_restored_exactly(store, refs, TOKENS)
    assert store.index.rebuild_pending() is None
    store.close()


def test_damage_met_while_running_is_recovered_and_writes_resume(tmp_path):
    store = make_store(tmp_path)
    refs = fill(store, TOKENS, flush=True)
    store.ram.clear()  # the next lookup goes to the index
    damage(tmp_path / "index", "page_headers")  # under the open environment

    assert store.match(refs, TOKENS).hits == []  # a miss, not an exception
    assert store.counters["index_rebuilds"] == 1 and store.disk.rebuilder.wait(30)
    assert_restored_exactly(store, refs, TOKENS)

    damage(tmp_path / "index", "page_headers")  # again: the next index write meets it
    more = list(range(900, 900 + 2 * BLOCK))
    more_refs = fill(store, more, flush=True)  # the write that met it failed; flush wrote it again
    assert store.counters["index_rebuilds"] == 2 and store.disk.rebuilder.wait(30)
    stats = store.stats()["disk"]
    assert stats["writable"] and stats["blocks"] == len(refs) + len(more_refs)
    store.ram.clear()
    assert_restored_exactly(store, more_refs, more)
    store.close()
    assert len(list(tmp_path.glob("index.damaged-*"))) == 1  # damaged copies do not pile up


def kvtier_verify(cache_dir, *extra):
    return subprocess.run([sys.executable, "-m", "daemon.cli", "verify", "--cache-dir", str(cache_dir), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("how", DAMAGES)
def test_verify_reports_a_damaged_index_and_fix_rebuilds_it(tmp_path, how):
    store = make_store(tmp_path)
    fill(store, TOKENS, flush=True)
    store.close()
    before = {k: (r.checksum, r.parent, r.depth) for k, r in decoded(Index(tmp_path / "index").items()).items()}
    damage(tmp_path / "index", how)

    report = kvtier_verify(tmp_path, "--json")
    assert report.returncode == 1, report.stdout + report.stderr
    assert [p["kind"] for p in json.loads(report.stdout)["problems"]] == ["index_damaged"]
    fixed = kvtier_verify(tmp_path, "--fix")
    assert fixed.returncode == 0 and "rebuilt from the block files: 4 entries" in fixed.stdout, fixed.stdout + fixed.stderr
    with ops.CacheDir(tmp_path, walk=True) as cache:
        assert cache.verify() == []
        assert {k: (r.checksum, r.parent, r.depth) for k, r in decoded(cache.disk.index.items()).items()} == before


@pytest.fixture(scope="module")
def served_cache(tmp_path_factory, llama_model):
    """A cache directory a real daemon filled with one agent prompt, then flushed on SIGTERM."""
    cache_dir = tmp_path_factory.mktemp("served") / "cache"
    daemon = Daemon(llama_model, cache_dir).start()
    messages = agent_messages("rebuild")
    ask(daemon, messages)
    daemon.stop()
    return cache_dir, messages


def ask(daemon, messages):
    response = daemon.client().chat.completions.create(
        model=str(daemon.model), messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    return response.choices[0].message.content, response.usage


def wait_for_rebuild(daemon, timeout=60.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        stats = daemon.get("/cache/stats")
        if not stats["disk"]["index_rebuilding"]:
            return stats
        time.sleep(0.1)
    raise AssertionError(f"the rebuild did not end: {stats}")


@pytest.mark.parametrize("how", DAMAGES)
def test_daemon_serves_and_reuses_after_its_index_is_damaged(served_cache, tmp_path, llama_model, reference, how):
    template, messages = served_cache
    cache_dir = tmp_path / "cache"
    shutil.copytree(template, cache_dir)
    files = len(list((cache_dir / "blocks").rglob("*.safetensors")))
    damage(cache_dir / "index", how)

    daemon = Daemon(llama_model, cache_dir).start()  # the old code died of SIGBUS, or stayed 503
    try:
        assert daemon.get("/health")["disk_writable"] is True
        stats = wait_for_rebuild(daemon)
        assert stats["disk"]["blocks"] == files and stats["counters"]["index_rebuilds"] == 1
        text, usage = ask(daemon, messages)
        assert text == reference.chat(messages, MAX_TOKENS)
        assert usage.model_extra["kvtier"]["disk_tokens"] > 0  # the rebuilt index found the files
    finally:
        daemon.stop(signal.SIGKILL)


def test_rebuild_indexes_only_files_that_check_out(tmp_path):
    """A file whose tensors were altered, or that predates files carrying their parent key,
    is removed by the rebuild, never indexed: a rebuilt index cannot serve wrong KV."""
    from kvtier.disk import encode_block

    store = make_store(tmp_path)
    refs = fill(store, TOKENS, flush=True)
    store.close()
    flipped = store.files.path_for(refs[2].hex)
    data = bytearray(flipped.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    begin, _ = json.loads(data[8:8 + header_len])["1.values.0"]["data_offsets"]
    data[8 + header_len + begin + 5] ^= 0x10  # one bit of the KV, not of the tokens or header
    flipped.write_bytes(bytes(data))
    old_ref = block_refs(list(range(7000, 7000 + BLOCK)), BLOCK, "fp-test")[0]
    old_style = {"key": old_ref.hex, "fingerprint": "fp-test", "kind": "kv"}  # no parent, depth, content
    store.files.write(old_ref.hex, encode_block(arrays_for(0), np.arange(7000, 7000 + BLOCK), old_style))
    damage(tmp_path / "index", "truncate")

    store = make_store(tmp_path)
    assert store.disk.rebuilder.wait(30)
    report = store.disk.rebuilder.last
    assert report is not None and report.indexed == 3 and report.removed == 2
    assert not flipped.exists() and not store.files.path_for(old_ref.hex).exists()
    assert store.match(refs, TOKENS).sources == ["disk", "disk"]  # the chain stops at the altered block
    store.close()


def test_keys_derived_from_a_file_are_the_ones_blocks_py_gives():
    from kvtier.blocks import derived_key, root_key, snapshot_ref

    tokens = list(range(3 * BLOCK + 5))
    refs = block_refs(tokens, BLOCK, "fp", partial_tail=True)  # three full blocks and a partial one
    for ref in refs:
        assert derived_key("kv", ref.parent, np.asarray(tokens[ref.index * BLOCK:(ref.index + 1) * BLOCK])) == ref.key
    for position in (BLOCK - 3, 2 * BLOCK, 3 * BLOCK + 5):
        snap = snapshot_ref(refs, tokens, position, BLOCK, "fp")
        after = np.asarray(tokens[snap.index * BLOCK:position])
        assert derived_key("snap", snap.parent, after) == snap.key
    assert snapshot_ref(refs, tokens, BLOCK - 3, BLOCK, "fp").parent == root_key("fp")


# -- records, order and totals on a healthy index ----------------------------------------
def key_of(name: int) -> bytes:
    return bytes([name]) * 16


def record(name: int, parent: int = 0, depth: int = 0, nbytes: int = 1000, access_ms: int = 1,
           kind: str = "kv", pinned: bool = False) -> tuple[bytes, BlockRecord, bytes]:
    """(key, record, tokens) as put_many takes them."""
    tokens = np.arange(name, name + 4, dtype=np.uint32).tobytes()
    rec = BlockRecord(parent=key_of(parent).hex(), fingerprint="fp", depth=depth, num_tokens=4,
                      nbytes=nbytes, checksum="c", tokens_hash="t", access_ms=access_ms, created_ms=1,
                      pinned=pinned, kind=kind, allocated=4096)
    return key_of(name), rec, tokens


@pytest.fixture
def index(tmp_path):
    index = Index(tmp_path / "index")
    yield index
    index.close()


def test_put_many_indexes_records_children_and_totals(index):
    index.put_many([record(1), record(2, parent=1, depth=1, nbytes=500),
                    record(3, parent=1, depth=1, kind="snap")])
    assert index.get(key_of(2)).nbytes == 500 and index.get(key_of(9)) is None
    assert set(index.get_many([key_of(1), key_of(9), key_of(3)])) == {key_of(1), key_of(3)}
    assert index.has_many([key_of(2), key_of(9)]) == {key_of(2)}
    assert index.totals() == (2500, 3) and index.allocated() == 3 * 4096
    tokens = np.arange(2, 6, dtype=np.uint32).tobytes()
    assert index.children(key_of(1)) == [(key_of(2), tokens)]
    assert [k for k, _ in index.children(key_of(1), kind="snap")] == [key_of(3)]
    assert index.children(key_of(2)) == []  # a prefix of no stored parent


def test_children_of_neighbouring_parents_stay_apart(index):
    """The children table is keyed parent + child: a scan stops at the parent's last child."""
    index.put_many([record(5, parent=1), record(6, parent=2), record(7, parent=2)])
    assert [k for k, _ in index.children(key_of(1))] == [key_of(5)]
    assert [k for k, _ in index.children(key_of(2))] == [key_of(6), key_of(7)]


def test_putting_a_key_again_replaces_its_record_and_counts_it_once(index):
    index.put_many([record(1, nbytes=1000, access_ms=5)])
    index.put_many([record(1, nbytes=300, access_ms=9)])
    assert index.get(key_of(1)).nbytes == 300 and index.totals() == (300, 1)
    assert index.allocated() == 4096 and index.oldest(10) == [key_of(1)]
    assert len(index.children(key_of(0))) == 1


def test_remove_drops_record_order_child_and_totals(index):
    index.put_many([record(1), record(2, parent=1, depth=1)])
    removed = index.remove(key_of(2))
    assert removed is not None and removed.depth == 1
    assert index.get(key_of(2)) is None and index.children(key_of(1)) == []
    assert index.oldest(10) == [key_of(1)] and index.totals() == (1000, 1)
    assert index.allocated() == 4096
    assert index.remove(key_of(2)) is None  # gone already: nothing to give back


def test_oldest_is_least_recently_used_deepest_first_and_never_pinned(index):
    index.put_many([record(1, access_ms=10), record(2, parent=1, depth=1, access_ms=10),
                    record(3, access_ms=5, pinned=True), record(4, access_ms=20)])
    # 3 is the oldest but pinned; 1 and 2 tie on time, the deeper one goes first.
    assert index.oldest(10) == [key_of(2), key_of(1), key_of(4)]
    assert index.oldest(1) == [key_of(2)]
    index.touch([key_of(2), key_of(9)], access_ms=30)  # an unknown key is skipped
    assert index.oldest(10) == [key_of(1), key_of(4), key_of(2)]
    assert index.get(key_of(2)).access_ms == 30
    assert index.set_pinned([key_of(1), key_of(3), key_of(9)], False) == 2
    assert index.oldest(10) == [key_of(3), key_of(1), key_of(4), key_of(2)]
    assert index.set_pinned([key_of(4)], True) == 1 and key_of(4) not in index.oldest(10)


def test_counters_and_models_add_up_and_survive_reopening(tmp_path):
    index = Index(tmp_path / "index")
    index.add_counters("fp-a", {"hits": 2, "misses": 1})
    index.add_counters("fp-a", {"hits": 3})
    index.add_counters("fp-b", {"hits": 1})
    index.register_model("fp-a", {"name": "a", "layers": 2})
    index.put_many([record(1)])
    index.close()
    index = Index(tmp_path / "index", readonly=True)  # as `kvtier stats` reads it
    assert index.counters() == {"fp-a": {"hits": 5, "misses": 1}, "fp-b": {"hits": 1}}
    assert index.models() == {"fp-a": {"name": "a", "layers": 2}}
    assert index.totals() == (1000, 1) and index.get(key_of(1)).fingerprint == "fp"
    index.close()


def test_garbage_in_a_record_is_a_miss_and_recount_skips_it(index):
    index.put_many([record(1), record(2, parent=1, depth=1)])
    with index.env.begin(write=True, db=index._blocks) as txn:
        txn.put(key_of(2), b"{not json")
    assert index.get(key_of(2)) is None and set(index.get_many([key_of(1), key_of(2)])) == {key_of(1)}
    assert dict(index.items())[key_of(2)] is None
    assert index.has_many([key_of(2)]) == {key_of(2)}  # there, just unreadable
    assert index.oldest(10) == [key_of(1)]
    assert index.recount() == (1000, 1) and index.totals() == (1000, 1)
    assert index.remove(key_of(2)) is None and index.has_many([key_of(2)]) == set()


def test_garbage_in_counters_and_models_is_ignored(index):
    with index.env.begin(write=True, db=index._meta) as txn:
        txn.put(b"counters:fp", b"[1, 2]")
    with index.env.begin(write=True, db=index._models) as txn:
        txn.put(b"fp-bad", b"\xff")
    index.register_model("fp-good", {"name": "g"})
    assert index.counters() == {} and index.models() == {"fp-good": {"name": "g"}}
    index.add_counters("fp", {"hits": 1})  # starts again from nothing
    assert index.counters() == {"fp": {"hits": 1}}


def test_the_budgets_reads_of_a_damaged_index_are_misses_not_exceptions(tmp_path):
    """allocated() and model_totals() (read by the budget and stats) meet damage as every
    other read does: reported, and an empty answer."""
    index = Index(tmp_path / "index")
    index.put_many([record(1), record(2, parent=1, depth=1)])
    assert index.allocated() == 8192 and index.model_totals()["fp"]["blocks"] == 2
    damage(tmp_path / "index", "page_headers")  # under the open environment
    assert index.allocated() == 0 and index.model_totals() == {}
    assert index.damage is not None
    index.close()


def test_garbage_in_the_allocated_total_counts_as_none_until_a_recount(index):
    index.put_many([record(1)])
    with index.env.begin(write=True, db=index._meta) as txn:
        txn.put(b"allocated", b"-x")
    assert index.allocated() == 0
    index.recount()
    assert index.allocated() == 4096


def test_a_rebuild_mark_is_kept_until_cleared(tmp_path):
    index = Index(tmp_path / "index")
    assert index.rebuild_pending() is None
    index.mark_rebuild("data.mdb is truncated")
    index.close()
    index = Index(tmp_path / "index")
    assert index.rebuild_pending() == "data.mdb is truncated"
    index.mark_rebuild(None)
    assert index.rebuild_pending() is None
    index.close()


# -- schema versions: an index of another version is rebuilt, never read ------------------
def schema_of(index_dir) -> bytes | None:
    index = Index(index_dir, readonly=True)
    try:
        with index.env.begin(db=index._meta) as txn:
            raw = txn.get(SCHEMA_KEY)
        return None if raw is None else bytes(raw)
    finally:
        index.close()


def test_a_new_index_is_written_with_the_schema_version(tmp_path):
    Index(tmp_path / "index").close()
    assert schema_of(tmp_path / "index") == str(SCHEMA_VERSION).encode()
    store = make_store(tmp_path)  # reopened as it is: no rebuild
    fill(store, TOKENS, flush=True)
    assert store.counters["index_rebuilds"] == 0 and store.index.rebuild_pending() is None
    store.close()
    assert schema_of(tmp_path / "index") == str(SCHEMA_VERSION).encode()


def a_newer_kvtiers_index(index_dir) -> None:
    """An index a newer kvtier wrote: a version above ours, a table of its own, and records
    that mean something else there (a checksum of another kind): read as ours, every file
    would look damaged."""
    index = Index(index_dir, readonly=True)
    records = decoded(index.items())
    index.close()
    as_an_older_kvtier_left_it(index_dir, schema=str(SCHEMA_VERSION + 1).encode())
    env = lmdb.open(str(index_dir), max_dbs=8)
    with env.begin(write=True, db=env.open_db(b"blocks")) as txn:
        for key, rec in records.items():
            txn.put(key, json.dumps(dict(asdict(rec), checksum="blake3:" + rec.checksum)).encode())
    with env.begin(write=True, db=env.open_db(b"tomorrow")) as txn:
        txn.put(b"what a newer kvtier keeps", b"1")
    env.close()


@pytest.mark.parametrize("left_by", ["older", "newer"])
def test_an_index_of_another_schema_version_is_rebuilt_from_the_files(tmp_path, caplog, left_by):
    store = make_store(tmp_path)
    refs = fill(store, TOKENS, flush=True)
    store.close()
    if left_by == "older":
        as_an_older_kvtier_left_it(tmp_path / "index")
    else:
        a_newer_kvtiers_index(tmp_path / "index")

    with caplog.at_level(logging.WARNING, logger="kvtier.index"):
        store = make_store(tmp_path)
    said = [r.getMessage() for r in caplog.records if "schema" in r.getMessage()]
    found = "none (an older kvtier's)" if left_by == "older" else SCHEMA_VERSION + 1
    assert said == [f"{tmp_path / 'index'}: index schema version {found}, this kvtier uses {SCHEMA_VERSION}: "
                    f"removed; a fresh index is rebuilt from the block files"]
    assert store.disk_enabled and store.disk.rebuilder.wait(30)
    assert store.counters["index_rebuilds"] == 1 and store.counters["damaged_blocks"] == 0
    assert_restored_exactly(store, refs, TOKENS)
    assert store.stats()["disk"]["entries"] == len(refs)
    store.close()
    assert schema_of(tmp_path / "index") == str(SCHEMA_VERSION).encode()
    assert not list(tmp_path.glob("index.*"))  # nothing kept beside it: the files hold it all


def test_the_cli_rebuilds_an_index_of_another_version_it_opens(tmp_path):
    store = make_store(tmp_path)
    refs = fill(store, TOKENS, flush=True)
    store.close()
    as_an_older_kvtier_left_it(tmp_path / "index")
    listed = subprocess.run([sys.executable, "-m", "daemon.cli", "stats", "--json", "--cache-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["disk"]["entries"] == len(refs)
    assert "index schema version none" in listed.stderr  # the one line that says why
    assert schema_of(tmp_path / "index") == str(SCHEMA_VERSION).encode()


def test_the_cli_leaves_an_index_of_another_version_that_kvtier_has_open(tmp_path):
    """Another version's daemon still running on it: the CLI neither reads nor replaces its
    index, and says in one line what to do."""
    store = make_store(tmp_path)
    fill(store, TOKENS, flush=True)
    store.close()
    as_an_older_kvtier_left_it(tmp_path / "index", schema=str(SCHEMA_VERSION + 1).encode())
    held = lmdb.open(str(tmp_path / "index"), max_dbs=8)  # as that daemon holds it
    try:
        listed = subprocess.run([sys.executable, "-m", "daemon.cli", "stats", "--cache-dir", str(tmp_path)],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        held.close()
    assert listed.returncode == 2 and listed.stderr.count("\n") == 1, listed.stderr
    assert "a kvtier of that version has it open: stop it" in listed.stderr
    index = lmdb.open(str(tmp_path / "index"), max_dbs=8, readonly=True)
    with index.begin(db=index.open_db(b"meta", create=False)) as txn:
        assert txn.get(b"schema") == str(SCHEMA_VERSION + 1).encode()
    index.close()


def test_meta_page_checks_accept_a_good_file_and_name_what_is_wrong(tmp_path):
    data = tmp_path / "index" / "data.mdb"
    assert data_file_problem(data) is None  # not made yet: LMDB makes it
    index = Index(tmp_path / "index")
    index.put_many([record(n) for n in range(1, 40)])
    index.close()
    assert data_file_problem(data) is None
    good = data.read_bytes()
    page = resource.getpagesize()
    data.write_bytes(good[:page])
    assert "meta page 1" in (data_file_problem(data) or "")
    data.write_bytes(good[:2 * page] + good[2 * page:][:page])
    assert "truncated" in (data_file_problem(data) or "")
    data.write_bytes(b"\0" * len(good))
    assert data_file_problem(data) == "meta page 0 is not an LMDB meta page"
