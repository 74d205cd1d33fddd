"""Administering a cache directory with the real `kvtier` CLI (stats, ls, purge, verify):
a model's fingerprint as `stats` and `ls` show it, pinned entries a purge keeps, what lies in
the directory besides our block files. Real LMDB, real block files, no model loaded."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT
from test_large_cache import BLOCK, LAYOUT, fill

from kvtier.config import CacheConfig
from kvtier.local import LocalDisk
from kvtier.tiers import TieredStore

# Two fingerprints of one model (as after an mlx upgrade), and a third sharing their first digits.
OLD_FP = "3f2a9c41d0b7" + "1" * 52
NEW_FP = "8e11d2a07c55" + "2" * 52
OTHER_FP = "3f2a00000000" + "3" * 52


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
