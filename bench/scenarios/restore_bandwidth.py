"""Part 3: restore bandwidth from SSD (kvtier after a restart, the cache's files evicted from
the page cache) against a raw sequential read of the same block files: the device's limit."""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from harness import DISK_PATH, Server, log, record, stream_chat, warm_up
from prompts import QUESTIONS, messages_for


def page_cache_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("Cached:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def drop_page_cache() -> dict:
    """Best effort (needs root on Linux): both reads below should come from the device."""
    before = page_cache_mb()
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        ok, error = True, None
    except OSError as exc:
        ok, error = False, str(exc)
    return {"ok": ok, "error": error, "page_cache_mb_before": before, "page_cache_mb_after": page_cache_mb()}


def evict_files(root: Path) -> dict:
    """Drop just the files under `root` (a cache directory: block files and index) from the
    page cache, written back first: their reads then come from the device, while the code and
    model weights the restore runs with stay in memory, as after a daemon restart. Dropping
    every cache (`drop_page_cache`) would also time the re-reading of Python's and MLX's code."""
    before, files = page_cache_mb(), 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # a write's temp file, renamed or removed since the listing
            continue
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            files += 1
        finally:
            os.close(fd)
    return {"ok": True, "error": None, "files": files, "page_cache_mb_before": before,
            "page_cache_mb_after": page_cache_mb()}


def into_page_cache(root: Path) -> dict:
    """Read every file under `root` once, so its reads come from the page cache: a daemon
    restart, where the files the last process wrote or read are still in memory."""
    return read_files(sorted(p for p in root.rglob("*") if p.is_file()))


def raw_read(root: Path, chunk: int = 64 << 20) -> dict:
    """Sequential read of every block file with large reads: the device's bandwidth."""
    return read_files(sorted(root.rglob("*.safetensors")), chunk)


def read_files(files: list[Path], chunk: int = 64 << 20) -> dict:
    """Sequential read of these files, in this order, with large reads."""
    buffer, total = memoryview(bytearray(chunk)), 0
    started = time.perf_counter()
    for path in files:
        total += _read_into(path, buffer)
    seconds = time.perf_counter() - started
    return {"files": len(files), "bytes": total, "seconds": seconds, "gb_per_s": total / seconds / 1e9}


def parallel_read(root: Path, streams: int = 4) -> dict:
    """Every block file read whole, `streams` files at a time: what the restore's four reader
    threads could get from a device that serves parallel reads faster than one stream."""
    files = sorted(root.rglob("*.safetensors"))
    started = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        total = sum(pool.map(lambda path: _read_into(path, memoryview(bytearray(16 << 20))), files))
    seconds = time.perf_counter() - started
    return {"files": len(files), "bytes": total, "seconds": seconds, "gb_per_s": total / seconds / 1e9,
            "streams": streams}


def _read_into(path: Path, buffer: memoryview) -> int:
    try:
        f = open(path, "rb", buffering=0)
    except FileNotFoundError:  # a write's temp file, renamed or removed since the listing
        return 0
    total = 0
    with f:
        while n := f.readinto(buffer):
            total += n
    return total


def run_restore(model: Path, system: str, work: Path, trials: int = 3) -> dict:
    """The prefix cached once, then `trials` restarts on a copy of that cache, each timing the
    restore from the device against raw reads of the same files: this VM's disk varies by
    up to 2x between runs, so the trial with the median ratio is reported, with all of them."""
    log("part 3: restore bandwidth from SSD vs a raw read of the block files")
    cache = work / "restore-cache"
    server = Server.kvtier(model, cache, work / "restore.log", *DISK_PATH)
    with server:  # stopping writes every block before the process exits
        warm_up(server, str(model))
        cold = record(stream_chat(server, str(model), messages_for(system, QUESTIONS[0])))
    runs = [restore_trial(model, system, cache, work / f"restore-trial-{i}") for i in range(trials)]
    median = sorted(runs, key=lambda run: run["ratio"])[len(runs) // 2]
    return {"cold": cold, **median, "ratios": [run["ratio"] for run in runs],
            "parallel_ratios": [run["parallel_ratio"] for run in runs]}


def restore_trial(model: Path, system: str, cache: Path, work: Path) -> dict:
    """kvtier restarted on a copy of `cache`, its files evicted, one request restoring the
    prefix; then the same files evicted and read raw, sequentially and 4 at a time."""
    shutil.copytree(cache, work / "cache")
    try:
        with Server.kvtier(model, work / "cache", work.with_suffix(".log"), *DISK_PATH) as server:
            warm_up(server, str(model))
            restore_drop = evict_files(work / "cache")  # after start: the model load is not what we time
            restored = record(stream_chat(server, str(model), messages_for(system, QUESTIONS[3])))
        raw_drop = evict_files(work / "cache")
        raw = raw_read(work / "cache" / "blocks")
        evict_files(work / "cache")
        parallel = parallel_read(work / "cache" / "blocks")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    k = restored["kvtier"] or {}
    bandwidth = k.get("restored_bytes", 0) / k["restore_seconds"] / 1e9 if k.get("restore_seconds") else 0.0
    return {"restored": restored, "restore_gb_per_s": bandwidth, "raw_read": raw, "parallel_read": parallel,
            "ratio": bandwidth / raw["gb_per_s"] if raw["gb_per_s"] else 0.0,
            "parallel_ratio": bandwidth / parallel["gb_per_s"] if parallel["gb_per_s"] else 0.0,
            "drop_caches": {"before_restore": restore_drop, "before_raw_read": raw_drop}}
