"""How fast this machine's disk reads block files, and at what CPU cost: through the page
cache (as kvtier's restore and the suite's raw-read baseline read them) against past it
(O_DIRECT, Linux), one file at a time and several in flight, the files evicted from the page
cache before every trial. The page-cache read is what the restore's "% of a raw read" is
measured against; the O_DIRECT read is closer to the device's own limit.

    python bench/disk_reads.py [--files 128] [--mb 1] [--dir DIR] [--trials 3]
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from scenarios.restore_bandwidth import evict_files

ALIGN = 4096  # O_DIRECT: buffer, offset and length aligned to the device's block


def write_files(directory: Path, count: int, size: int) -> list[Path]:
    """Files of random bytes, the size of a block file (not a multiple of the alignment)."""
    paths = []
    for i in range(count):
        path = directory / f"block{i:05d}.bin"
        path.write_bytes(os.urandom(size))
        paths.append(path)
    return paths


def read_one(path: Path, buffer: memoryview, direct: bool) -> int:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        size = os.fstat(fd).st_size
        wanted = -(-size // ALIGN) * ALIGN if direct else size
        done = 0
        while done < size:
            n = os.preadv(fd, [buffer[done:wanted]], done)
            if n == 0:
                break
            done += n
        return done
    finally:
        os.close(fd)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


def trial(paths: list[Path], root: Path, direct: bool, streams: int) -> dict:
    """One read of every file, `streams` at a time, into page-aligned buffers of their own."""
    largest = max(p.stat().st_size for p in paths)
    buffers = [memoryview(mmap.mmap(-1, -(-largest // ALIGN) * ALIGN)) for _ in range(streams)]
    for buffer in buffers:
        buffer[:] = b"\0" * len(buffer)  # touched: page faults are no part of the read
    evict_files(root)
    time.sleep(0.2)
    cpu, started = cpu_seconds(), time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        total = sum(pool.map(lambda i: read_one(paths[i], buffers[i % streams], direct), range(len(paths))))
    seconds = time.perf_counter() - started
    return {"bytes": total, "seconds": seconds, "cpu_seconds": cpu_seconds() - cpu}


def run(paths: list[Path], root: Path, trials: int, streams_list: list[int]) -> list[dict]:
    """Every (way, streams) pair once per round, the rounds alternating: the VM's drift is shared."""
    modes = [(direct, streams) for streams in streams_list for direct in (False, True)]
    if not hasattr(os, "O_DIRECT"):
        modes = [m for m in modes if not m[0]]
    results: dict = {mode: [] for mode in modes}
    for _ in range(trials):
        for mode in modes:
            results[mode].append(trial(paths, root, *mode))
    rows = []
    for (direct, streams), runs in results.items():
        median = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
        rows.append({"way": "O_DIRECT" if direct else "page cache", "streams": streams,
                     "gb_per_s": [r["bytes"] / r["seconds"] / 1e9 for r in runs],
                     "cpu_ms_per_mb": statistics.median(r["cpu_seconds"] * 1e3 / (r["bytes"] / 2**20) for r in runs),
                     "median": median})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| read | files in flight | GB/s (each trial) | median | CPU ms per MB (median) |",
             "|---|---:|---:|---:|---:|"]
    for row in rows:
        median = row["median"]["bytes"] / row["median"]["seconds"] / 1e9
        each = ", ".join(f"{g:.2f}" for g in row["gb_per_s"])
        lines.append(f"| {row['way']} | {row['streams']} | {each} | {median:.2f} | {row['cpu_ms_per_mb']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=128)
    parser.add_argument("--mb", type=float, default=1.0, help="size of each file (the test model's block: ~1 MB)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to write them: on the disk the cache lives on (default: a temp dir in .)")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--streams", default="1,4,8")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kvtier-disk-reads-", dir=args.dir or Path.cwd()))
    try:
        paths = write_files(root, args.files, int(args.mb * 2**20) + 123)
        os.sync()
        rows = run(paths, root, args.trials, [int(s) for s in args.streams.split(",")])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{args.files} files of {args.mb:g} MB, evicted before each trial; {args.trials} trials, alternating.")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
