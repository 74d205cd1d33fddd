"""kvtier's two forward passes of a warm request against plain mlx-lm's, alternated in one
process (issue 16: is kvtier's `prefill` + `first_token` slower than mlx-lm's same schedule?).

A prompt of `--length` random tokens is computed once; then, `--repeats` times in turn:
- kvtier: a request of that prefix and 8 new tokens through the engine's own steps (`begin`:
  the live cache taken over; `prefill_chunks`; `mx.clear_cache()`; `decode.first_token` for its first
  token; `finish`), each step timed (wall and process CPU), with its minor page faults and
  MLX's peak memory above what was in use (a copy of the prefix would show as its bytes);
- mlx-lm: `generate_step` with the same 8 tokens as its prompt over an mlx-lm KVCache holding
  the prefix at kvtier's capacity (no growing), on its own schedule (7 tokens, then 1);
- mlx-lm as bench/steps.py's "compute alone" builds it: a KVCache of exactly the prefix, which
  its first pass grows by a concatenation (a copy of the prefix) inside the timed call.
Medians per step. In-process only; no files kept.

    python bench/passes.py [--length 16384] [--repeats 6]
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT  # noqa: E402
from steps import prefix_cache_of, prefix_held  # noqa: E402

NEW_TOKENS = 8  # the warm requests of bench/steps.py compute 7 + 1


def measured(rows: dict, name: str, fn):
    """Run `fn`, adding (wall s, CPU s, minor faults, peak MB above the memory in use) to rows[name]."""
    import mlx.core as mx

    mx.synchronize()
    in_use, faults = mx.get_active_memory(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    mx.reset_peak_memory()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    mx.synchronize()
    rows.setdefault(name, []).append((time.perf_counter() - wall, time.process_time() - cpu,
                                      resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults,
                                      max(0, mx.get_peak_memory() - in_use) / 1e6))
    return out


def kvtier_request(engine, tokens: list[int], rows: dict) -> None:
    import mlx.core as mx

    from kvtier.decode import first_token, greedy
    from kvtier.requests import GenerationRequest

    engine.store.wait_for_writes()
    session = measured(rows, "kvtier begin", lambda: engine.begin(GenerationRequest(tokens, 2, temperature=0.0)))
    measured(rows, "kvtier prefill", lambda: [None for _ in engine.prefill_chunks(session)])
    measured(rows, "kvtier clear_cache", mx.clear_cache)
    measured(rows, "kvtier first_token",  # the scheduler's first token (Scheduler._first_token_alone)
             lambda: first_token(engine.model, tokens, session.prompt_cache, greedy))
    engine.finish(session)  # offered live again: the next request takes it over
    wall = [r[0] for r in rows["kvtier prefill"]][-1] + [r[0] for r in rows["kvtier first_token"]][-1]
    cpu = [r[1] for r in rows["kvtier prefill"]][-1] + [r[1] for r in rows["kvtier first_token"]][-1]
    rows.setdefault("kvtier prefill + first_token", []).append((wall, cpu, 0, 0.0))


def mlx_lm_first_token(engine, tokens: list[int], cache: list, reuse: int, rows: dict, name: str) -> None:
    import mlx.core as mx
    from mlx_lm.generate import generate_step, generation_stream

    stream = generate_step(mx.array(tokens[reuse:]), engine.model, prompt_cache=cache, max_tokens=1,
                           prefill_step_size=engine.prefill_step_size)
    measured(rows, name, lambda: next(stream))
    stream.close()
    mx.synchronize(generation_stream)
    for layer in cache:
        layer.trim(layer.offset - reuse)  # back to the prefix; the buffers keep their capacity


def run(length: int, repeats: int) -> dict:
    import mlx.core as mx

    from kvtier.config import CacheConfig
    from kvtier.engine import Engine
    from kvtier.requests import GenerationRequest
    from kvtier.scheduler import generate
    from tests.support.testmodels import make_model

    model = make_model(ROOT / ".models" / "llama", "llama")
    rng = random.Random(0)
    prefix = [rng.randrange(10, 4000) for _ in range(length)]

    def prompt() -> list[int]:
        return prefix + [rng.randrange(10, 4000) for _ in range(NEW_TOKENS)]

    engine = Engine(str(model), CacheConfig(cache_dir=Path(tempfile.mkdtemp(prefix="kvtier-passes-")) / "cache",
                                            ram_budget=8 << 30))
    rows: dict = {}
    try:
        for _ in range(2):  # cold, then one warm: the live cache exists from here
            list(generate(engine, GenerationRequest(prompt(), 2, temperature=0.0)))
            engine.store.wait_for_writes()
        tokens = prompt()
        _, held = prefix_cache_of(engine, tokens)  # from the blocks: the live cache stays
        grown = prefix_held(engine, held, length, capacity=length)
        engine.model(mx.array(tokens[length:-1])[None], cache=grown)  # grown to kvtier's capacity once
        mx.eval([c.state for c in grown])
        for layer in grown:
            layer.trim(layer.offset - length)
        list(generate(engine, GenerationRequest(prompt(), 2, temperature=0.0)))
        for _ in range(repeats):
            kvtier_request(engine, prompt(), rows)
            mlx_lm_first_token(engine, prompt(), grown, length, rows, "mlx-lm, KVCache at kvtier's capacity")
            exact = prefix_held(engine, held, length, capacity=length)  # as bench/steps.py's compute alone
            mlx_lm_first_token(engine, prompt(), exact, length, rows, "mlx-lm, KVCache of exactly the prefix (grows)")
            del exact
    finally:
        engine.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args(argv)
    rows = run(args.length, args.repeats)
    print(f"prefix {args.length:,} tokens + {NEW_TOKENS} new, {args.repeats} alternated repeats (medians)")
    print("| step | wall ms | CPU ms | minor faults | peak above in use, MB | wall ms each |")
    print("|---|---:|---:|---:|---:|---|")
    for name, values in rows.items():
        median = [statistics.median(v[k] for v in values) for k in range(4)]
        print(f"| {name} | {1e3 * median[0]:.1f} | {1e3 * median[1]:.1f} | {median[2]:.0f} | {median[3]:.0f} | "
              f"{' '.join(str(round(1e3 * v[0])) for v in values)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
