"""Large caches: how start-up, one lookup, the CLI's stats/ls/purge/verify and eviction
scale with the number of cached blocks (1K, 10K, 100K by default).

Each cache is built through the disk tier's own parts (block files in the block format,
indexed by the LMDB index in batches) for a tiny generated layout: 2 layers, 4 KV heads of
16, float16, blocks of 16 tokens (about 12 KiB a file), in chains of CHAIN blocks. The
build skips the per-file fsync of the daemon's writer (it is not what is measured) and
syncs once at the end. Every cache is deleted after it is measured.

    python bench/scale.py [--sizes 1000,10000,100000] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, command_line, machine_description, target_table, write_result  # noqa: E402
from kvtier.blocks import block_refs, encode_tokens, tokens_hash  # noqa: E402
from kvtier.config import CacheConfig  # noqa: E402
from kvtier.disk import BlockFiles, checksum, encode_block  # noqa: E402
from kvtier.index import BlockRecord, Index, allocated_estimate, now_ms  # noqa: E402
from kvtier.local import LocalDisk  # noqa: E402

BLOCK = 16
HEADS, HEAD_DIM, LAYERS = 4, 16, 2
LAYOUT: dict[str, tuple[tuple[int, ...], str]] = {f"{i}.{kv}.0": ((1, HEADS, BLOCK, HEAD_DIM), "float16") for i in range(LAYERS)
          for kv in ("keys", "values")}
FINGERPRINT = "scale-bench"
CHAIN = 10  # blocks per cached prefix
LOOKUP_CHAIN = 8  # blocks of the prefix one lookup restores
EVICT_BLOCKS = 2000  # at most, blocks evicted by the per-block eviction measurement
BATCH = 2000  # blocks indexed per transaction while building
SIZES, QUICK_SIZES = [1000, 10000, 100000], [1000, 10000]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def chain_tokens(chain: int, cached: bool = True) -> np.ndarray:
    """The tokens of prefix number `chain`; those of an uncached prefix share no token with
    any cached one (not even the first, which a partial tail match would take)."""
    rng = np.random.default_rng(chain)
    low = 0 if cached else 32000
    return rng.integers(low, low + 32000, CHAIN * BLOCK, dtype=np.uint32)


# -- building a cache -------------------------------------------------------------------------
def build(cache_dir: Path, blocks: int) -> dict:
    """`blocks` blocks in chains of CHAIN, written as the disk tier writes them."""
    started = time.perf_counter()
    cache_dir.mkdir(mode=0o700)
    index, files = Index(cache_dir / "index"), BlockFiles(cache_dir / "blocks")
    index.register_model(FINGERPRINT, {"name": "scale-bench-tiny", "path": "/nonexistent"})
    rng = np.random.default_rng(0)
    pool = [{name: rng.standard_normal(shape).astype(np.float16) for name, (shape, _) in LAYOUT.items()}
            for _ in range(8)]
    pending, stamp = [], now_ms() - blocks  # oldest first: the LRU order is the build order
    for chain in range(-(-blocks // CHAIN)):
        tokens = chain_tokens(chain)
        for ref in block_refs(tokens, BLOCK, FINGERPRINT)[: blocks - chain * CHAIN]:
            block_tokens = tokens[ref.index * BLOCK : (ref.index + 1) * BLOCK]
            meta = {"key": ref.hex, "fingerprint": FINGERPRINT, "kind": "kv", "parent": ref.parent.hex(),
                    "depth": str(ref.index)}
            payload = encode_block(pool[(chain + ref.index) % len(pool)], block_tokens, meta)
            path = files.path_for(ref.hex)
            path.parent.mkdir(exist_ok=True, mode=0o700)
            path.write_bytes(payload)
            stamp += 1
            record = BlockRecord(parent=ref.parent.hex(), fingerprint=FINGERPRINT, depth=ref.index,
                                 num_tokens=BLOCK, nbytes=len(payload), checksum=checksum(payload),
                                 tokens_hash=tokens_hash(block_tokens), access_ms=stamp, created_ms=stamp,
                                 allocated=allocated_estimate(len(payload)))
            pending.append((ref.key, record, encode_tokens(block_tokens)))
            if len(pending) >= BATCH:
                index.put_many(pending)
                pending = []
    index.put_many(pending)
    index.close()
    os.sync()
    return {"build_seconds": round(time.perf_counter() - started, 2)}


# -- measurements -----------------------------------------------------------------------------
def timed(fn: Callable[[], object], repeats: int = 1) -> float:
    """The median wall time of `repeats` calls."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def config_for(cache_dir: Path) -> CacheConfig:
    return CacheConfig(cache_dir=cache_dir, block_size=BLOCK, disk_budget=1 << 40)


def measure_startup(cache_dir: Path) -> dict:
    """What the daemon does at start-up besides loading the model: open the store (the disk
    tier: index checks and open, budget), and the background sweep of leftovers."""
    from kvtier.tiers import TieredStore

    started = time.perf_counter()
    store = TieredStore(config_for(cache_dir), FINGERPRINT, LAYOUT)
    opened = time.perf_counter() - started
    store.swept.wait()
    swept = time.perf_counter() - started
    store.close()
    return {"startup_seconds": round(opened, 4), "sweep_seconds": round(swept, 4)}


def daemon_ready_seconds(model: Path, cache_dir: Path, log_file: Path) -> float:
    """`kvtier serve` from process start to its first healthy /health (model load included)."""
    from harness import Server

    server = Server.kvtier(model, cache_dir, log_file, "--block-size", str(BLOCK))
    started = time.perf_counter()
    server.proc = subprocess.Popen(server.args, cwd=ROOT, env=os.environ, stdout=open(log_file, "ab"),
                                   stderr=subprocess.STDOUT)
    try:
        while True:
            if server.proc.poll() is not None:
                raise RuntimeError(f"kvtier serve exited; see {log_file}")
            try:
                with urllib.request.urlopen(server.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return time.perf_counter() - started
            except OSError:
                time.sleep(0.02)
    finally:
        server.stop()


def measure_daemon(cache_dir: Path, work: Path) -> dict:
    """The daemon's start-up with this cache, less the same start-up with an empty cache
    directory (the model load and everything else the cache does not change); best of 3."""
    from tests.support.testmodels import make_model

    model = make_model(ROOT / ".models" / "tiny", "llama", hidden=64, layers=2)
    empty_runs: list[float] = []
    full_runs: list[float] = []
    for i in range(3):  # interleaved: the load other jobs put on the machine drifts
        empty_runs.append(daemon_ready_seconds(model, work / f"empty-{i}", work / "serve.log"))
        full_runs.append(daemon_ready_seconds(model, cache_dir, work / "serve.log"))
    empty, full = min(empty_runs), min(full_runs)
    return {"daemon_ready_seconds": round(full, 3), "daemon_empty_seconds": round(empty, 3),
            "daemon_startup_seconds": round(max(full - empty, 0.0), 3)}


def measure_lookup(cache_dir: Path, blocks: int) -> dict:
    """One request's lookup: match (index reads, file reads, checks) of a cached prefix of
    LOOKUP_CHAIN blocks, on disk only, and of a prefix the cache does not hold."""
    from kvtier.tiers import TieredStore

    store = TieredStore(config_for(cache_dir), FINGERPRINT, LAYOUT)
    try:
        store.swept.wait()
        chains = max(blocks // CHAIN, 1)
        picks = [int(c) for c in np.linspace(0, chains - 1, 9)]
        hit_times, miss_times = [], []
        for chain in picks * 3:  # each three times: the OS's page cache holds its files after the first
            tokens = chain_tokens(chain)[: LOOKUP_CHAIN * BLOCK + 3].tolist()
            refs = block_refs(tokens, BLOCK, FINGERPRINT)
            started = time.perf_counter()
            match = store.match(refs, tokens)
            hit_times.append(time.perf_counter() - started)
            assert match.num_full_blocks(BLOCK) == min(LOOKUP_CHAIN, blocks), match.sources
            miss = chain_tokens(chain, cached=False)[: LOOKUP_CHAIN * BLOCK].tolist()
            miss_refs = block_refs(miss, BLOCK, FINGERPRINT)
            started = time.perf_counter()
            assert not store.match(miss_refs, miss).hits
            miss_times.append(time.perf_counter() - started)
    finally:
        store.close()
    return {"lookup_hit_ms": round(1000 * statistics.median(hit_times), 3),
            "lookup_miss_ms": round(1000 * statistics.median(miss_times), 3)}


def cli(*args: str) -> tuple[float, str]:
    """A `kvtier` command as a user runs it (a fresh process); its wall time and output."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "daemon.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    elapsed = time.perf_counter() - started
    if done.returncode not in (0, 1):
        raise RuntimeError(f"kvtier {' '.join(args)} failed: {done.stderr[-2000:]}")
    return elapsed, done.stdout


def measure_cli(cache_dir: Path, blocks: int) -> dict:
    where = ["--cache-dir", str(cache_dir), "--json"]
    out: dict = {}
    out["stats_seconds"], text = cli("stats", *where)
    stats = json.loads(text)
    assert stats["disk"]["entries"] == blocks, stats["disk"]
    out["ls_seconds"], text = cli("ls", *where, "--limit", "50")
    listed = json.loads(text)
    assert len(listed) == min(50, -(-blocks // CHAIN)), len(listed)
    out["verify_seconds"], text = cli("verify", *where)
    problems = json.loads(text)["problems"]
    assert not problems, problems[:3]
    out["evict_us_per_block"] = measure_eviction(cache_dir)
    used = json.loads(cli("stats", *where)[1])["disk"]["used_bytes"]
    out["purge_seconds"], text = cli("purge", *where, "--to-size", str(used // 2))
    out["purge_removed"] = json.loads(text)["removed"]
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def measure_eviction(cache_dir: Path) -> float:
    """Microseconds per block to evict EVICT_BLOCKS least recently used blocks (the budget's
    own eviction, as the writer runs it)."""
    with LocalDisk.existing(cache_dir) as disk:
        count = min(EVICT_BLOCKS, disk.index.totals()[1] // 2)
        per_block = next(iter(disk.index.get_many(disk.index.oldest(1)).values())).allocated
        target = disk.disk_used() - count * per_block
        started = time.perf_counter()
        removed = disk.evict_to(target)
        elapsed = time.perf_counter() - started
    return 1e6 * elapsed / max(removed, 1)


def measure_size(blocks: int, work: Path) -> dict:
    cache_dir = work / f"cache-{blocks}"
    try:
        log(f"{blocks} blocks: building")
        result = {"blocks": blocks, **build(cache_dir, blocks)}
        result["disk_bytes"] = sum(p.stat().st_blocks * 512 for p in cache_dir.rglob("*"))
        log(f"{blocks} blocks: built in {result['build_seconds']} s; start-up, lookup")
        result.update(measure_startup(cache_dir))
        result.update(measure_lookup(cache_dir, blocks))
        result.update(measure_daemon(cache_dir, work))
        log(f"{blocks} blocks: stats, ls, verify, eviction, purge")
        result.update(measure_cli(cache_dir, blocks))
        log(f"{blocks} blocks: {result}")
        return result
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def run(sizes: list[int], work: Path | None = None) -> dict:
    """The scale measurements at each size: a result dict (see `render` and `targets`)."""
    work = work or Path(tempfile.mkdtemp(prefix="kvtier-scale-", dir=ROOT / ".bench"
                                         if (ROOT / ".bench").is_dir() else None))
    try:
        rows = [measure_size(n, work) for n in sizes]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = {"sizes": sizes, "rows": rows, "machine": machine_description(),
               "layout": f"{LAYERS} layers, {HEADS} KV heads of {HEAD_DIM}, float16, block size {BLOCK}, "
                         f"chains of {CHAIN} blocks"}
    results["targets"] = targets(results)
    return results


# -- targets and report -----------------------------------------------------------------------
def flatness(rows: list[dict], key: str) -> float:
    """The largest size's value over the smallest's: 1.0 is perfectly flat."""
    return rows[-1][key] / max(rows[0][key], 1e-9)


def targets(results: dict) -> list[dict]:
    """Pass/fail lines for the suite's target table (values in seconds or ratios)."""
    rows = results["rows"]
    big = rows[-1]
    label = f"{big['blocks'] // 1000}K blocks"
    checks = [(f"daemon start-up (no model load) at {label} < 1 s", big["daemon_startup_seconds"], "< 1 s",
               big["daemon_startup_seconds"] < 1.0),
              (f"kvtier stats at {label} < 2 s", big["stats_seconds"], "< 2 s", big["stats_seconds"] < 2.0)]
    if len(rows) > 1:
        small = f"{rows[0]['blocks'] // 1000}K"
        for key, what in (("lookup_hit_ms", "one lookup"), ("evict_us_per_block", "eviction per block")):
            ratio = flatness(rows, key)
            checks.append((f"{what}: {label} / {small} blocks <= 2x", ratio, "<= 2x", ratio <= 2.0))
    return [{"name": n, "value": round(v, 3), "shown": f"{v:.2f} s" if t.endswith(" s") else f"{v:.2f}x",
             "target": t, "pass": bool(ok)} for n, v, t, ok in checks]


def table(results: dict) -> list[str]:
    header = ["blocks", "disk", "build", "daemon start-up", "store open", "sweep", "lookup (hit)", "lookup (miss)", "stats",
              "ls (50)", "verify", "purge to half", "eviction / block"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for r in results["rows"]:
        cells = [f"{r['blocks']:,}", f"{r['disk_bytes'] / 2**20:.0f} MiB", f"{r['build_seconds']:.1f} s",
                 f"{r['daemon_startup_seconds']:.2f} s", f"{r['startup_seconds']:.3f} s", f"{r['sweep_seconds']:.2f} s", f"{r['lookup_hit_ms']:.2f} ms",
                 f"{r['lookup_miss_ms']:.2f} ms", f"{r['stats_seconds']:.2f} s", f"{r['ls_seconds']:.2f} s",
                 f"{r['verify_seconds']:.1f} s", f"{r['purge_seconds']:.2f} s ({r['purge_removed']:,})",
                 f"{r['evict_us_per_block']:.0f} us"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render(results: dict, command: str) -> str:
    return "\n".join([
        "## Large caches: 1K to 100K blocks", "",
        f"Measured {time.strftime('%Y-%m-%d')} on {results['machine']} (a shared VM: ratios between "
        f"sizes matter more than the absolute times). Command: `{command}`.",
        f"Layout: {results['layout']}. Daemon start-up: `kvtier serve` (a generated 2-layer model, hidden "
        "64) from process start to a healthy `/health`, less the same with an empty cache directory: "
        "what the cache adds (best of three each). Store open: the same opening in-process, alone "
        "(the index check is then not overlapped with a model load); sweep: until the background "
        f"sweep of leftovers is done. Lookup: `TieredStore.match` of an {LOOKUP_CHAIN}-block prefix read from disk, and of "
        "a prefix not cached. stats, ls, verify, purge: `kvtier` commands in a fresh process (Python "
        f"start-up included); purge `--to-size` half the cache. Eviction: up to {EVICT_BLOCKS} least recently "
        "used blocks (half the cache at most) evicted by the disk tier's budget code, per block.", "",
        *table(results), "", *target_table(results["targets"]),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--write", action="store_true", help="write the section of docs/benchmarks.md")
    args = parser.parse_args(argv)
    results = run([int(n) for n in args.sizes.split(",")])
    text = render(results, command_line("scale.py", argv))
    print(text)
    if args.write:
        write_result("scale", results, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
