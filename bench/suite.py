"""The benchmark suite: kvtier vs mlx_lm.server on one generated model and one prompt set.

Parts, all measured in one run:
  1. time to first token at several prefix lengths: cold, warm (new question), after a
     restart, and after memory pressure (kvtier only; the hot tier spilled to disk)
  2. an agent-trace replay (long system prompt with tools, tool results, suffix edits,
     one restart) against both servers, and against kvtier with the cache off
  3. restore bandwidth from SSD vs a raw sequential read of the same block files
  4. decode tokens/s in-process: kvtier's Engine vs mlx_lm.stream_generate
  5. large caches at 1K/10K/100K blocks: start-up, lookup, stats, ls, verify, purge,
     eviction (bench/scale.py)
  6. memory of the hot tier and a live cache against their raw KV bytes (bench/memory.py)
  7. a per-step breakdown of warm and after-restart requests beside plain mlx-lm's compute
     and mlx_lm.server's TTFT, and the restore's bandwidth in-process (bench/steps.py)

What each part measures is in scenarios/ (a module a part); suite_report.py checks the
targets and writes OUT/bench/suite.json, OUT/bench/suite_*.png and the `suite` section of
OUT/benchmarks.md (OUT = docs/ by default; a temp dir with --quick).
    make bench            (or: python bench/suite.py [--quick])
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import memory
import scale
import steps
from harness import ROOT, command_line, log, machine_description
from scenarios.agent_replay import run_agent
from scenarios.decode_speed import run_decode
from scenarios.restore_bandwidth import run_restore
from scenarios.ttft_by_length import length_systems, run_ttft
from suite_report import evaluate, render, write_outputs

FULL = {"lengths": "1024,4096,8192,16384", "agent_system_tokens": 10000, "agent_requests": 40,
        "decode_tokens": 256}
QUICK = {"lengths": "512,1024", "agent_system_tokens": 1500, "agent_requests": 12, "decode_tokens": 64}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes for a smoke run; writes to a temp dir unless --out is given")
    parser.add_argument("--lengths", help=f"prefix lengths for part 1 (default {FULL['lengths']})")
    parser.add_argument("--agent-system-tokens", type=int, help="default 10000")
    parser.add_argument("--agent-requests", type=int, help="default 40")
    parser.add_argument("--decode-tokens", type=int, help="default 256")
    parser.add_argument("--decode-repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="where benchmarks.md and bench/ go (default docs/)")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.lengths = sorted(int(n) for n in str(args.lengths).split(","))
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="kvtier-suite-")) if args.quick else ROOT / "docs"
    return args


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from transformers import AutoTokenizer

    from tests.support.testmodels import make_model

    started = time.perf_counter()
    model = make_model(ROOT / ".models" / "llama", "llama")
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    systems = length_systems(args.lengths, tokenizer)
    work = Path(tempfile.mkdtemp(prefix="kvtier-suite-work-"))
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": machine_description(),
                               "model": ".models/llama", "command": command_line("suite.py", argv),
                               "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    try:
        results["ttft"] = run_ttft(model, systems, work)
        results["agent"] = run_agent(model, tokenizer, args.agent_system_tokens, args.agent_requests, work)
        results["restore"] = run_restore(model, systems[max(args.lengths)], work)
        results["decode"] = run_decode(model, args.decode_tokens, args.decode_repeats, work)
        results["scale"] = scale.run(scale.QUICK_SIZES if args.quick else scale.SIZES)
        results["memory"] = memory.run(work / "memory")
        results["steps"] = steps.run(steps.QUICK_LENGTHS if args.quick else steps.LENGTHS, work / "steps")
    except BaseException:
        log(f"failed; server logs and caches kept in {work}")
        raise
    shutil.rmtree(work, ignore_errors=True)
    results["targets"] = (evaluate(results) + results["scale"]["targets"] + results["memory"]["targets"]
                          + results["steps"]["targets"])
    results["seconds"] = time.perf_counter() - started
    write_outputs(results, args.out)
    print(render(results))
    log(f"wrote {args.out / 'bench' / 'suite.json'}, plots and {args.out / 'benchmarks.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
