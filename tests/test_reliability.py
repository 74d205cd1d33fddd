"""Faults injected into the real daemon and cache directory: kill -9 mid-write, a full or
read-only disk, garbage in the index. Afterwards the cache verifies (or repairs) cleanly and
every answer equals plain mlx-lm."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import ROOT, agent_messages

MAX_TOKENS = 8

# The faults but kill -9 (timed into a llama request) and the disk-size one (llama's KV bytes
# against the filesystem's) run on the tiny model: conftest's tiny_reference.

def ask(daemon, messages):
    response = daemon.client().chat.completions.create(
        model=str(daemon.model), messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    return response.choices[0].message.content, response.usage


def verify(cache_dir, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon.cli", "verify", "--cache-dir", str(cache_dir), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_kill_9_at_random_moments_never_corrupts(daemon, reference):
    rng = random.Random(7)
    asked = []
    for round_ in range(3):  # seeded kills 0.85, 0.56, 1.41 s into requests of three lengths
        messages = agent_messages(f"crash-{round_}", repeat=4 + round_)
        asked.append(messages)
        worker = threading.Thread(target=lambda m=messages: _ignore_errors(ask, daemon, m))
        worker.start()
        time.sleep(rng.uniform(0.3, 2.0))  # during prefill, decode or the background write
        daemon.stop(signal.SIGKILL)
        worker.join(timeout=60)
        daemon.start()
    daemon.stop(signal.SIGKILL)
    report = verify(daemon.cache_dir)
    if report.returncode != 0:  # only stray temp/orphan files may be left: repaired cleanly
        assert "damaged" not in report.stdout and "dangling" not in report.stdout, report.stdout
        assert verify(daemon.cache_dir, "--fix").returncode == 0
    daemon.start()
    for messages in asked:
        assert ask(daemon, messages)[0] == reference.chat(messages, MAX_TOKENS)


def _ignore_errors(fn, *args):
    try:
        fn(*args)
    except Exception:
        pass  # the daemon was killed under this request


def test_garbage_index_entry_is_a_miss_and_verify_repairs_it(daemon_factory, tiny_model, tiny_reference):
    daemon = daemon_factory(tiny_model)
    messages = agent_messages("garbage")
    expected = tiny_reference.chat(messages, MAX_TOKENS)
    assert ask(daemon, messages)[0] == expected
    daemon.stop()
    import lmdb

    env = lmdb.open(str(daemon.cache_dir / "index"), max_dbs=8)
    blocks = env.open_db(b"blocks")
    with env.begin(write=True, db=blocks) as txn:
        keys = [bytes(k) for k, _ in txn.cursor()]
        txn.put(keys[0], b"\x00garbage{")  # the first block of the chain
        txn.put(b"\x01" * 16, b"not json at all")
    env.close()
    daemon.start()
    text, usage = ask(daemon, messages)
    assert text == expected
    daemon.stop()
    report = verify(daemon.cache_dir)
    assert report.returncode == 1 and "undecodable_record" in report.stdout
    assert verify(daemon.cache_dir, "--fix").returncode == 0
    assert verify(daemon.cache_dir).returncode == 0


@pytest.fixture
def small_fs(tmpfs):
    """A real 24 MB filesystem for the cache."""
    return tmpfs("24m")


def _wait_for(daemon, predicate, timeout=30.0, path="/health") -> dict:
    """Poll `path` until `predicate` holds of its JSON; return that JSON."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        seen = daemon.get(path)
        if predicate(seen):
            return seen
        time.sleep(0.2)
    raise AssertionError(f"condition not reached on {path}: {seen}")


def test_full_disk_keeps_serving_from_ram_and_resumes(daemon_factory, tiny_model, tiny_reference, small_fs):
    reference = tiny_reference
    daemon = daemon_factory(tiny_model, cache_dir=small_fs / "cache")
    filler = small_fs / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M", "count=64"], capture_output=True)
    first = agent_messages("full-disk")
    assert ask(daemon, first)[0] == reference.chat(first, MAX_TOKENS)
    health = _wait_for(daemon, lambda h: not h["disk_writable"])
    assert "No space" in health["disk_error"] or "ENOSPC" in health["disk_error"] or "MDB" in health["disk_error"]
    text, usage = ask(daemon, first)  # still served, from RAM
    assert text == reference.chat(first, MAX_TOKENS)
    assert usage.prompt_tokens_details.cached_tokens > 0
    assert daemon.get("/cache/stats")["disk"]["writable"] is False

    filler.unlink()  # space is back
    second = agent_messages("after-full")
    assert ask(daemon, second)[0] == reference.chat(second, MAX_TOKENS)
    _wait_for(daemon, lambda h: h["disk_writable"])
    daemon.restart()  # what failed before was written once space returned
    text, usage = ask(daemon, first)
    assert text == reference.chat(first, MAX_TOKENS)
    assert usage.model_extra["kvtier"]["disk_tokens"] > 0


def _writes_done(daemon) -> dict:
    return _wait_for(daemon, lambda s: s["disk"]["queued_jobs"] == 0, path="/cache/stats")


def test_disk_smaller_than_the_budget_evicts_and_says_full_steadily(daemon_factory, llama_model, reference,
                                                                    tmpfs):
    """An 8 MB filesystem under a 1 GB budget: once the cache has filled it, the oldest
    entries are evicted to make room, and "disk full" is reported on every look until the
    filesystem grows; then it clears by itself, and the newest conversation is on disk."""
    point = tmpfs("8m")
    daemon = daemon_factory(llama_model, "--disk-budget", "1GB", cache_dir=point / "cache")
    reports = []
    for i in range(5):  # ~2.5 MB of blocks each
        messages = agent_messages(f"small-disk-{i}")
        assert ask(daemon, messages)[0] == reference.chat(messages, MAX_TOKENS)
        _writes_done(daemon)
        reports += [daemon.get("/health") for _ in range(3)]
    stats = daemon.get("/cache/stats")
    assert stats["counters"].get("disk_evictions", 0) > 0 and stats["disk"]["full"]
    assert stats["counters"].get("disk_write_errors", 0) == 0  # room was made before writing
    first_full = next(i for i, health in enumerate(reports) if not health["disk_writable"])
    assert first_full < len(reports) - 3
    assert [h["disk_writable"] for h in reports[first_full:]] == [False] * (len(reports) - first_full)  # steady
    assert all(h["disk_error"].startswith("disk full") for h in reports[first_full:])

    subprocess.run(["mount", "-o", "remount,size=64m", str(point)], check=True)
    _wait_for(daemon, lambda h: h["disk_writable"])  # no request needed to notice
    daemon.restart()
    text, usage = ask(daemon, messages)
    assert text == reference.chat(messages, MAX_TOKENS) and usage.model_extra["kvtier"]["disk_tokens"] > 0



@contextmanager
def read_only(cache: Path):
    """The cache directory read-only for the block (a read-only bind mount over it, its block
    subdirectories already there, as in a well-used cache), then writable again."""
    for byte in range(256):
        (cache / "blocks" / f"{byte:02x}").mkdir(exist_ok=True, mode=0o700)
    if subprocess.run(["mount", "--bind", str(cache), str(cache)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(cache)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(cache)], check=True)


def test_read_only_cache_directory_keeps_serving_and_resumes(daemon_factory, tiny_model, tiny_reference):
    """The cache directory becomes read-only under a running daemon (a read-only bind mount
    over it, its block subdirectories already there, as in a well-used cache), then writable
    again: the failure is reported while it lasts and clears by itself."""
    reference = tiny_reference
    daemon = daemon_factory(tiny_model)
    with read_only(daemon.cache_dir):
        messages = agent_messages("read-only")
        assert ask(daemon, messages)[0] == reference.chat(messages, MAX_TOKENS)
        health = _wait_for(daemon, lambda h: not h["disk_writable"])
        assert "Read-only" in health["disk_error"]
        text, usage = ask(daemon, messages)  # served from RAM
        assert text == reference.chat(messages, MAX_TOKENS) and usage.prompt_tokens_details.cached_tokens > 0
        stats = daemon.get("/cache/stats")
        assert stats["counters"]["disk_write_errors"] > 0 and stats["disk"]["blocks"] == 0
        assert not daemon.get("/health")["disk_writable"]  # still, not just once
    _wait_for(daemon, lambda h: h["disk_writable"])  # no request needed to notice
    other = agent_messages("writable-again")
    assert ask(daemon, other)[0] == reference.chat(other, MAX_TOKENS)
    daemon.restart()  # what failed before was written once the disk took writes again
    text, usage = ask(daemon, messages)
    assert text == reference.chat(messages, MAX_TOKENS) and usage.model_extra["kvtier"]["disk_tokens"] > 0


def test_blocks_of_a_read_only_spell_are_written_when_it_ends_without_another_request(
        daemon_factory, tiny_model, tiny_reference):
    """Blocks computed while the cache directory was read-only reach the disk once it is
    writable again, with no request after: a kill -9 then loses none of them."""
    reference = tiny_reference
    daemon = daemon_factory(tiny_model)
    with read_only(daemon.cache_dir):
        messages = agent_messages("read-only-spell")
        assert ask(daemon, messages)[0] == reference.chat(messages, MAX_TOKENS)
        _wait_for(daemon, lambda h: not h["disk_writable"])
        assert daemon.get("/cache/stats")["disk"]["blocks"] == 0
    # No request from here on: the daemon writes what it holds by itself.
    _wait_for(daemon, lambda s: s["disk"]["blocks"] > 0 and s["disk"]["queued_jobs"] == 0,
              path="/cache/stats")
    daemon.stop(signal.SIGKILL)
    daemon.start()
    text, usage = ask(daemon, messages)
    assert text == reference.chat(messages, MAX_TOKENS) and usage.model_extra["kvtier"]["disk_tokens"] > 0


def test_index_truncated_under_a_running_daemon_is_rebuilt_at_the_next_start(daemon_factory, tiny_model,
                                                                             tiny_reference):
    """data.mdb cut short while the daemon runs: LMDB's next touch of the lost pages may kill
    the process (SIGBUS, which Python cannot catch; the service managers restart it, see
    daemon/service.py). The next start finds the damage before mapping the file, serves,
    rebuilds the index from the block files, and answers from them exactly."""
    reference = tiny_reference
    daemon = daemon_factory(tiny_model)
    messages = agent_messages("truncated-index")
    assert ask(daemon, messages)[0] == reference.chat(messages, MAX_TOKENS)
    _wait_for(daemon, lambda s: s["disk"]["blocks"] > 0 and s["disk"]["queued_jobs"] == 0, path="/cache/stats")
    os.truncate(daemon.cache_dir / "index" / "data.mdb", 4096)
    _ignore_errors(ask, daemon, agent_messages("after-the-cut"))
    daemon.stop(signal.SIGKILL)  # if it still runs: a service manager restarts it either way
    daemon.start()
    stats = _wait_for(daemon, lambda s: not s["disk"]["index_rebuilding"] and s["disk"]["blocks"] > 0,
                      path="/cache/stats")
    assert stats["counters"].get("index_rebuilds", 0) >= 1
    text, usage = ask(daemon, messages)
    assert text == reference.chat(messages, MAX_TOKENS) and usage.model_extra["kvtier"]["disk_tokens"] > 0

def test_unusable_cache_directory_at_start_up_still_serves(daemon_factory, tiny_model, tiny_reference, tmp_path,
                                                          monkeypatch):
    """The cache path is taken by a file: the daemon loads anyway, serves exact answers from
    RAM, and its health and stats say the disk tier is off and why. Its scratch index does
    not outlive it, even killed with -9."""
    reference = tiny_reference
    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch_root))
    cache_path = tmp_path / "taken"
    cache_path.write_text("not a directory")
    daemon = daemon_factory(tiny_model, cache_dir=cache_path)
    health = daemon.get("/health")
    assert health["disk_writable"] is False and "FileExistsError" in health["disk_error"]
    messages = agent_messages("no-disk")
    assert ask(daemon, messages)[0] == reference.chat(messages, MAX_TOKENS)
    text, usage = ask(daemon, messages)
    assert text == reference.chat(messages, MAX_TOKENS)
    assert usage.model_extra["kvtier"]["ram_tokens"] > 0
    assert daemon.get("/cache/stats")["disk"]["blocks"] == 0
    assert cache_path.read_text() == "not a directory"
    killed = list(scratch_root.glob("kvtier-ram-only-*"))
    assert len(killed) == 1
    daemon.stop(signal.SIGKILL)
    daemon.start()
    assert not killed[0].exists() and len(list(scratch_root.glob("kvtier-ram-only-*"))) == 1
