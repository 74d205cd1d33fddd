"""Peak resident memory of one restore from disk: a 16K-token prefix cached once, then each
trial a fresh process restores it (its files evicted from the page cache) and reports how
much its peak RSS grew, against the KV bytes restored. Run it from two checkouts to compare.

    python bench/restore_memory.py [--trials 2]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from scenarios.restore_bandwidth import evict_files

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PREFIX = 16384
MODEL = ROOT / ".models" / "llama"


def prompt() -> list[int]:
    return np.random.default_rng(0).integers(10, 4000, PREFIX + 20).tolist()


def engine_on(cache: Path, model: Path):
    from kvtier.config import CacheConfig
    from kvtier.engine import Engine

    return Engine(str(model), CacheConfig(cache_dir=cache))


def build(cache: Path, model: Path) -> None:
    from kvtier.requests import GenerationRequest
    from kvtier.scheduler import generate

    engine = engine_on(cache, model)
    list(generate(engine, GenerationRequest(prompt()[:PREFIX], max_tokens=1, temperature=0.0)))
    engine.close()


def measure(cache: Path, model: Path) -> None:
    """In this process: evict the cache's files, restore the prompt's prefix, print one line."""
    from kvtier.requests import GenerationRequest

    engine = engine_on(cache, model)
    evict_files(cache)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    started = time.perf_counter()
    session = engine.begin(GenerationRequest(prompt(), max_tokens=1, temperature=0.0))
    seconds = time.perf_counter() - started
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    kv = session.usage.restored_bytes
    print(f"restored {session.usage.disk_tokens} tokens from disk, {kv / 1e6:.0f} MB in {seconds * 1e3:.0f} ms; "
          f"peak RSS grew {grew / 1e6:.0f} MB ({grew / kv:.2f}x the KV bytes)", flush=True)
    engine.abandon(session)
    engine.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # one trial's process
    args = parser.parse_args()
    if args.measure:  # the model exists: making it would raise this process's peak first
        measure(args.measure, MODEL)
        return 0
    from tests.support.testmodels import make_model

    model = make_model(MODEL, "llama")
    base = Path(tempfile.mkdtemp(prefix="kvtier-restore-memory-"))
    try:
        build(base / "cache", model)
        for _ in range(args.trials):
            subprocess.run([sys.executable, __file__, "--measure", str(base / "cache")], check=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
