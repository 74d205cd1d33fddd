"""`make demo`: an agent-style session against the kvtier daemon, on a generated demo model.

Two projects, each with its own long system prompt and tool definitions; turns with tool
results; a daemon restart in the middle; a switch between the projects. The same session
is then replayed on a daemon with the cache turned off, for the totals and to show that
every answer is identical.
"""

from __future__ import annotations

import argparse
import shutil
import sys

from harness import ROOT, Server, Step, Timed, run_session
from prompts import agent_system_prompt


def print_table(cached: list[tuple[Step, Timed]], plain: list[tuple[Step, Timed]]) -> None:
    print(f"\n{'#':>2}  {'request':<15} {'prompt':>7} {'TTFT':>8} {'no cache':>9} "
          f"{'from RAM':>9} {'prefetched':>10} {'from disk':>9} {'computed':>9}  same text")
    for i, ((step, kv), (_, base)) in enumerate(zip(cached, plain), 1):
        k = kv.usage.get("kvtier", {})
        print(f"{i:>2}  {step.label:<15} {kv.usage['prompt_tokens']:>7} {kv.ttft:>7.2f}s {base.ttft:>8.2f}s "
              f"{k.get('ram_tokens', 0):>9} {k.get('prefetched_tokens', 0):>10} {k.get('disk_tokens', 0):>9} "
              f"{k.get('computed_tokens', 0):>9}  {'yes' if kv.text == base.text else 'NO'}")
    print("(prefetched: of the tokens from RAM, those the restarted daemon's start-up prefetch had read "
          "from its SSD tier)")
    total_kv = sum(t.ttft for _, t in cached)
    total_base = sum(t.ttft for _, t in plain)
    reused = sum(t.usage["prompt_tokens_details"]["cached_tokens"] for _, t in cached)
    prompt = sum(t.usage["prompt_tokens"] for _, t in cached)
    from_ssd = sum(t.usage.get("kvtier", {}).get(name, 0) for _, t in cached
                   for name in ("disk_tokens", "prefetched_tokens"))
    print(f"\nTotal time to first token: {total_kv:.1f} s with kvtier vs {total_base:.1f} s without a cache "
          f"({total_base / max(total_kv, 1e-9):.1f}x faster); {reused} of {prompt} prompt tokens "
          f"({100 * reused / prompt:.0f}%) came from the cache, {from_ssd} of them from SSD "
          f"(read by the request, or prefetched into RAM after the restart).")


def main() -> int:
    parser = argparse.ArgumentParser(description="kvtier demo: an agent session with a restart")
    parser.add_argument("--system-tokens", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from tests.support.testmodels import make_model

    work = ROOT / ".demo"
    shutil.rmtree(work, ignore_errors=True)
    print("generating the demo model (a random-weight llama, loaded by mlx_lm.load) ...", flush=True)
    model = make_model(ROOT / ".models" / "llama", "llama")
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    systems = {name: agent_system_prompt(args.system_tokens, tokenizer, project=name, seed=i)
               for i, name in enumerate(["webshop", "compiler"])}

    print("running the session on kvtier (with a daemon restart in the middle) ...", flush=True)
    cached = run_session(Server.kvtier(model, work / "cache", work / "kvtier.log"), str(model),
                         systems, args.max_tokens)
    print("replaying it with the cache off (--ram-budget 0 --disk-budget 0) ...", flush=True)
    plain = run_session(Server.kvtier(model, work / "nocache", work / "nocache.log",
                                      "--ram-budget", "0", "--disk-budget", "0"),
                        str(model), systems, args.max_tokens)
    print_table(cached, plain)
    return 0 if all(a.text == b.text for (_, a), (_, b) in zip(cached, plain)) else 1


if __name__ == "__main__":
    sys.exit(main())
