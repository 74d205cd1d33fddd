"""Memory: what the hot tier and a live request's cache occupy, against the raw KV bytes
they hold (target: at most 1.5x).

In-process Engine on the suite's generated model (llama, hidden 512, 8 layers, float32).
REQUESTS distinct prompts fill the hot tier; then, while one more request decodes (its
prompt cache live), and again after it, MLX's active memory and the process's resident
set (after MLX's buffer cache is cleared) are compared with a baseline taken after the
model load and one warm-up request. Raw bytes: the hot tier's own count (the arrays of
every block it holds) plus, while decoding, the live cache's tokens times the model's KV
bytes per token.

    python bench/memory.py [--write]
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, machine_description, write_result  # noqa: E402

REQUESTS = 6
PROMPT_TOKENS = 1500
TARGET_RATIO = 1.5


def resident() -> int:
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()  # freed buffers MLX keeps for reuse are not what the caches hold
    return psutil.Process().memory_info().rss


def kv_bytes_per_token(layout: dict) -> int:
    import numpy as np

    return sum(math.prod(shape) * np.dtype("float16" if dtype == "bfloat16" else dtype).itemsize
               for shape, dtype in layout.values())


def prompt(seed: int, vocab: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, vocab) for _ in range(PROMPT_TOKENS)]


def run(work: Path | None = None) -> dict:
    import mlx.core as mx

    from kvtier.config import CacheConfig
    from kvtier.engine import Engine
    from kvtier.requests import GenerationRequest
    from kvtier.scheduler import generate
    from tests.support.testmodels import make_model

    model = make_model(ROOT / ".models" / "llama", "llama")
    scratch = None if work else Path(tempfile.mkdtemp(prefix="kvtier-memory-"))
    work = work or scratch
    assert work is not None
    engine = Engine(str(model), CacheConfig(cache_dir=work / "cache", ram_budget=8 << 30))
    try:
        store, vocab = engine.store, 1000
        per_token = kv_bytes_per_token(store.layout)

        def ask(seed: int, during=None) -> None:
            chunks = generate(engine, GenerationRequest(prompt(seed, vocab), 16, temperature=0.0))
            for i, _ in enumerate(chunks):
                if during is not None and i == 8:
                    during()
            store.flush()

        ask(0)
        base_active, base_rss = mx.get_active_memory(), resident()
        hot_before = store.hot_bytes()
        for seed in range(1, REQUESTS + 1):
            ask(seed)
        live: dict = {}

        def measure_live() -> None:
            live.update(active=mx.get_active_memory(), rss=resident(), hot=store.hot_bytes())

        ask(REQUESTS + 1, during=measure_live)
        after_active, after_rss, hot = mx.get_active_memory(), resident(), store.hot_bytes() - hot_before
        live_raw = live["hot"] - hot_before + (PROMPT_TOKENS + 8) * per_token
    finally:
        engine.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    ratio = lambda used, raw: round(used / raw, 3)  # noqa: E731
    result = {
        "machine": machine_description(), "model": ".models/llama (hidden 512, 8 layers, float32)",
        "requests": REQUESTS + 1, "prompt_tokens": PROMPT_TOKENS, "kv_bytes_per_token": per_token,
        "hot_raw_bytes": hot, "hot_active_ratio": ratio(after_active - base_active, hot),
        "hot_rss_ratio": ratio(after_rss - base_rss, hot),
        "live_raw_bytes": live_raw, "live_active_ratio": ratio(live["active"] - base_active, live_raw),
        "live_rss_ratio": ratio(live["rss"] - base_rss, live_raw),
    }
    worst = max(result["hot_rss_ratio"], result["live_rss_ratio"], result["hot_active_ratio"],
                result["live_active_ratio"])
    result["targets"] = [{"name": f"memory of hot tier + live caches <= {TARGET_RATIO}x their raw KV bytes",
                          "value": worst, "shown": f"{worst:.2f}x", "target": f"<= {TARGET_RATIO}x",
                          "pass": worst <= TARGET_RATIO}]
    return result


def table(result: dict) -> list[str]:
    mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    return ["| what | raw KV bytes | MLX active / raw | resident (RSS) / raw |", "|---|---:|---:|---:|",
            f"| hot tier after {result['requests']} requests | {mib(result['hot_raw_bytes'])} | "
            f"{result['hot_active_ratio']:.2f}x | {result['hot_rss_ratio']:.2f}x |",
            f"| hot tier + one live request (decoding) | {mib(result['live_raw_bytes'])} | "
            f"{result['live_active_ratio']:.2f}x | {result['live_rss_ratio']:.2f}x |"]


def render(result: dict) -> str:
    target = result["targets"][0]
    return "\n".join([
        "## Memory: the hot tier and a live cache against their raw KV bytes", "",
        f"Measured {time.strftime('%Y-%m-%d')} on {result['machine']} (other jobs sharing the cores). "
        f"Command: `python bench/memory.py --write`. Model: {result['model']}; {result['requests']} "
        f"requests of {result['prompt_tokens']} distinct prompt tokens each, "
        f"{result['kv_bytes_per_token']} KV bytes per token. Memory: MLX's active memory, and the "
        "process's resident set after MLX's buffer cache is cleared, above a baseline taken after the "
        "model load and a warm-up request. Raw: the bytes of the arrays the hot tier counts, plus the "
        "live request's tokens times the KV bytes per token.", "",
        *table(result), "",
        f"Target: {target['name']}: {target['shown']} ({'pass' if target['pass'] else 'FAIL'}).",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write the section of docs/benchmarks.md")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    result = run()
    text = render(result)
    print(text, f"\n({time.perf_counter() - started:.0f} s)")
    if args.write:
        write_result("memory", result, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
