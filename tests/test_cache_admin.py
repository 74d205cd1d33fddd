"""Administering a cache directory with the real `kvtier` CLI (stats, ls, purge, verify):
a model's fingerprint as `stats` and `ls` show it, pinned entries a purge keeps, what lies in
the directory besides our block files (real LMDB, real block files, no model loaded); and a
daemon's cache directory as an operator meets it (the in-process app): the start-up prefetch
of an empty cache, the directory deleted under it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvtier.config import CacheConfig
from kvtier.local import LocalDisk
from kvtier.tiers import TieredStore
from tests.conftest import ROOT, agent_messages
from tests.test_large_cache import BLOCK, LAYOUT, fill

# Two fingerprints of one model (as after an mlx upgrade), and a third sharing their first digits.
OLD_FP = "3f2a9c41d0b7" + "1" * 52
NEW_FP = "8e11d2a07c55" + "2" * 52
OTHER_FP = "3f2a00000000" + "3" * 52
MAX_TOKENS = 8


def kvtier(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def kvtier_json(*args: str):
    result = kvtier(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def cache_of(path: Path, fingerprints: dict[str, str], prefixes: int = 2) -> None:
    """`prefixes` cached prefixes of two blocks for each fingerprint, under its model name."""
    for n, (fingerprint, name) in enumerate(fingerprints.items()):
        store = TieredStore(CacheConfig(cache_dir=path, block_size=BLOCK), fingerprint, LAYOUT)
        store.register_model({"name": name, "path": f"/models/{name}"})
        for i in range(prefixes):
            fill(store, [100_000 * (n + 1) + 1000 * i + t for t in range(2 * BLOCK)])
        store.close()


def entries_of(path: Path) -> dict[str, int]:
    with LocalDisk.existing(path) as cache:
        found: dict[str, int] = {}
        for record in cache.records().values():
            found[record.fingerprint] = found.get(record.fingerprint, 0) + 1
        return found


def test_purge_takes_the_fingerprint_stats_shows_or_any_unique_start(tmp_path):
    cache_of(tmp_path, {OLD_FP: "qwen", NEW_FP: "qwen", OTHER_FP: "llama"})
    cache = str(tmp_path)
    shown = kvtier("stats", "--cache-dir", cache).stdout
    assert f"[{OLD_FP[:12]}]" in shown

    purged = kvtier_json("purge", "--model", OLD_FP[:12], "--cache-dir", cache)
    assert purged["removed"] == 4 and purged["models"] == [OLD_FP]
    assert entries_of(tmp_path) == {NEW_FP: 4, OTHER_FP: 4}

    unique_now = kvtier("purge", "--model", "3f2a", "--cache-dir", cache)  # OLD_FP has no entries left
    assert unique_now.returncode == 0, unique_now.stderr
    assert entries_of(tmp_path) == {NEW_FP: 4}


def test_purge_refuses_an_ambiguous_or_unknown_model(tmp_path):
    cache_of(tmp_path, {OLD_FP: "qwen", OTHER_FP: "llama"})
    cache = str(tmp_path)
    ambiguous = kvtier("purge", "--model", "3f2a", "--cache-dir", cache)
    assert ambiguous.returncode != 0 and "more than one" in ambiguous.stderr
    assert OLD_FP[:12] in ambiguous.stderr and OTHER_FP[:12] in ambiguous.stderr
    unknown = kvtier("purge", "--model", "mistral", "--cache-dir", cache)
    assert unknown.returncode != 0 and "no cached model" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1
    assert entries_of(tmp_path) == {OLD_FP: 4, OTHER_FP: 4}  # nothing removed
    by_name = kvtier_json("purge", "--model", "llama", "--cache-dir", cache)
    assert by_name["removed"] == 4 and entries_of(tmp_path) == {OLD_FP: 4}


def test_purge_says_when_pinned_entries_were_kept(tmp_path):
    cache_of(tmp_path, {OLD_FP: "qwen"})
    cache = str(tmp_path)
    first = kvtier_json("ls", "--cache-dir", cache)[0]
    assert kvtier("pin", first["key"][:12], "--cache-dir", cache).returncode == 0
    result = kvtier("purge", "--model", "qwen", "--cache-dir", cache)
    assert result.returncode == 0, result.stderr
    assert "kept 2 pinned entries" in result.stdout
    assert entries_of(tmp_path) == {OLD_FP: 2}


def test_ls_tells_two_fingerprints_of_one_model_apart(tmp_path):
    cache_of(tmp_path, {OLD_FP: "qwen", NEW_FP: "qwen"}, prefixes=1)
    listed = kvtier("ls", "--cache-dir", str(tmp_path))
    assert listed.returncode == 0, listed.stderr
    rows = listed.stdout.splitlines()[1:]
    assert sorted(row.split()[2] for row in rows) == sorted([OLD_FP[:12], NEW_FP[:12]])
    assert all(row.split()[1] == "qwen" for row in rows)


def _wait_for(daemon, ready, what: str, timeout: float = 60) -> dict:
    """/cache/stats once `ready(stats)` holds (a background task's end), else TimeoutError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = daemon.get("/cache/stats")
        if ready(stats):
            return stats
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not happen")


def test_the_start_up_prefetch_of_an_empty_cache_says_it_is_done(app_factory, llama_model):
    daemon = app_factory(llama_model, "--prefetch", "64MB")
    stats = _wait_for(daemon, lambda s: (s["prefetch"] or {}).get("done"), "the prefetch's end")
    assert stats["prefetch"]["entries"] == 0 and stats["prefetch"]["stopped"] is None


def test_purging_an_unknown_model_over_http_is_a_400(app_factory, llama_model):
    daemon = app_factory(llama_model)
    reply = daemon.request("DELETE", "/cache?model=mistral")
    assert reply.status == 400 and reply.json()["error"]["param"] == "model"
    assert daemon.request("DELETE", "/cache?model=default").status == 200  # the loaded model's alias


def old(path: Path) -> Path:
    """Dated back past verify's grace for writes in flight."""
    os.utime(path, (0, 0))
    return path


def test_verify_reports_and_fix_removes_a_directory_in_a_block_files_place(tmp_path):
    cache_of(tmp_path, {OLD_FP: "qwen"})
    cache = str(tmp_path)
    indexed = sorted((tmp_path / "blocks").rglob("*.safetensors"))[0]
    indexed.unlink()
    indexed.mkdir()
    (indexed / "inside").write_bytes(b"x" * 5000)
    unindexed = indexed.parent / ("ab" * 16 + ".safetensors")
    unindexed.mkdir()
    old(unindexed)

    report = kvtier("verify", "--cache-dir", cache, "--json")
    assert report.returncode == 1, report.stderr
    problems = json.loads(report.stdout)["problems"]
    assert sorted((p["kind"], p["key"]) for p in problems) == sorted(
        [("not_a_file", indexed.name.removesuffix(".safetensors")), ("not_a_file", "ab" * 16)])
    fixed = kvtier("verify", "--fix", "--cache-dir", cache)
    assert fixed.returncode == 0, fixed.stderr
    assert not indexed.exists() and not unindexed.exists()
    assert kvtier("verify", "--cache-dir", cache).returncode == 0
    assert entries_of(tmp_path) == {OLD_FP: 3}


def test_stats_counts_what_du_counts_and_verify_lists_leftovers_and_foreign_files(tmp_path):
    cache_of(tmp_path, {OLD_FP: "qwen"})
    cache = str(tmp_path)
    block = sorted((tmp_path / "blocks").rglob("*.safetensors"))[0]
    temp = block.parent / f".{'cd' * 16}.0123abcd.tmp"  # a write a kill -9 interrupted
    temp.write_bytes(b"t" * 70_000)
    old(temp)
    foreign = [tmp_path / "blocks" / "notes.txt", block.parent / "copy.bin"]
    for path in foreign:
        path.write_bytes(b"f" * 50_000)

    disk = kvtier_json("stats", "--cache-dir", cache)["disk"]
    du = int(subprocess.run(["du", "-sB1", cache], capture_output=True, text=True, check=True).stdout.split()[0])
    assert disk["on_disk_bytes"] == du
    assert (disk["leftover_files"], disk["foreign_files"]) == (1, 2)
    assert disk["leftover_bytes"] >= 70_000 and disk["foreign_bytes"] >= 100_000
    assert "foreign files" in kvtier("stats", "--cache-dir", cache).stdout

    report = json.loads(kvtier("verify", "--cache-dir", cache, "--json").stdout)
    assert [p["kind"] for p in report["problems"]] == ["temp_file"]
    assert sorted(p["key"] for p in report["foreign"]) == ["copy.bin", "notes.txt"]
    assert kvtier("verify", "--fix", "--cache-dir", cache).returncode == 0
    assert not temp.exists() and all(path.exists() for path in foreign)  # not ours: left
    again = kvtier("verify", "--cache-dir", cache)
    assert again.returncode == 0 and "2 foreign file(s)" in again.stdout


def test_the_daemons_sweep_leaves_foreign_files(tmp_path):
    cache_of(tmp_path, {OLD_FP: "qwen"})
    block = sorted((tmp_path / "blocks").rglob("*.safetensors"))[0]
    temp = block.parent / f".{'cd' * 16}.0123abcd.tmp"
    temp.write_bytes(b"t")
    foreign = block.parent / "copy.bin"
    foreign.write_bytes(b"f")
    for path in (temp, foreign):
        old(path)
    store = TieredStore(CacheConfig(cache_dir=tmp_path, block_size=BLOCK), OLD_FP, LAYOUT)
    assert store.disk.swept.wait(60)
    store.close()
    assert not temp.exists() and foreign.exists()


def _chat(daemon, messages: list[dict]) -> tuple[str, dict]:
    reply = daemon.client().chat.completions.create(model=str(daemon.model), messages=messages,
                                                    max_tokens=MAX_TOKENS, temperature=0)
    return reply.choices[0].message.content, reply.usage.model_extra["kvtier"]


def _on_disk(daemon) -> int:
    return len(list((daemon.cache_dir / "blocks").rglob("*.safetensors")))


@pytest.mark.parametrize("deleted", ["cache directory", "index"])
def test_a_cache_directory_deleted_under_the_daemon_is_made_again(app_factory, tiny_model, tiny_reference, deleted):
    """Stats and metrics keep answering, saying what happened; answers stay exact; the
    directory and its index are made again, and later blocks are written to them (on the
    tiny model: none of it depends on the model's size)."""
    reference = tiny_reference
    daemon = app_factory(tiny_model)
    first = agent_messages("alpha")
    assert _chat(daemon, first)[0] == reference.chat(first, MAX_TOKENS)
    _wait_for(daemon, lambda s: s["disk"]["entries"] > 0, "the first write")
    shutil.rmtree(daemon.cache_dir if deleted == "cache directory" else daemon.cache_dir / "index")

    stats = daemon.get("/cache/stats")  # at once: before the daemon has noticed, or after
    assert stats["disk"]["writable"] is False or (daemon.cache_dir / "index").exists()
    metrics = daemon.request("GET", "/metrics")
    assert metrics.status == 200 and "kvtier" in metrics.text
    assert _chat(daemon, first)[0] == reference.chat(first, MAX_TOKENS)
    _wait_for(daemon, lambda s: s["disk"]["writable"] and (daemon.cache_dir / "index" / "data.mdb").exists(),
              "the index made again")
    assert daemon.cache_dir.stat().st_mode & 0o777 == 0o700

    before = _on_disk(daemon)
    second = agent_messages("beta")
    assert _chat(daemon, second)[0] == reference.chat(second, MAX_TOKENS)
    stats = _wait_for(daemon, lambda s: _on_disk(daemon) > before and s["disk"]["entries"] >= _on_disk(daemon),
                      "the next blocks written")
    assert stats["disk"]["error"] is None
    on_file = kvtier_json("stats", "--cache-dir", str(daemon.cache_dir))["disk"]  # what a restart would find
    assert on_file["entries"] == stats["disk"]["entries"] > 0
