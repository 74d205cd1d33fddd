"""Time to first token, kvtier vs mlx_lm.server, side by side on one model and one prompt set.

Scenarios, for each server in turn:
  cold           a fresh server and an empty cache: the whole ~3,600-token prompt is computed
  warm repeat    the same request again
  warm new turn  the same system prompt and tools, a different user question
  after restart  the server restarted, then the same system prompt with another new question

Writes docs/bench/ttft.json and the table in docs/benchmarks.md.
    make bench            (or: python bench/ttft.py --prompt-tokens 3600)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import ROOT, Server, command_line, machine_description, stream_chat, write_section
from prompts import QUESTIONS, agent_system_prompt, messages_for


def run_server(server: Server, model: str, system: str, repeats: int) -> dict:
    server.start()
    try:
        cold = stream_chat(server, model, messages_for(system, QUESTIONS[0]))
        warm = [stream_chat(server, model, messages_for(system, QUESTIONS[0])) for _ in range(repeats)]
        turn = [stream_chat(server, model, messages_for(system, q)) for q in QUESTIONS[1:1 + repeats]]
        server.restart()
        after = stream_chat(server, model, messages_for(system, QUESTIONS[-1]))
    finally:
        server.stop()
    return {
        "cold": cold.ttft,
        "warm_repeat": statistics.median(t.ttft for t in warm),
        "warm_new_turn": statistics.median(t.ttft for t in turn),
        "after_restart": after.ttft,
        "prompt_tokens": cold.usage.get("prompt_tokens"),
        "after_restart_cached": (after.usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
        # kvtier's split by tier: RAM (the start-up prefetch's blocks; live of them) or disk.
        "after_restart_sources": {k: v for k, v in (after.usage.get("kvtier") or {}).items()
                                  if k in ("ram_tokens", "live_tokens", "disk_tokens")},
        "texts": [cold.text, after.text],
    }


def _sources(kv: dict) -> str:
    """Where the after-restart request's cached tokens came from (older results: disk)."""
    s = kv.get("after_restart_sources")
    if not s:
        return " from disk"
    return (f": {s.get('ram_tokens', 0)} from RAM (read back by the start-up prefetch; {s.get('live_tokens', 0)} "
            f"of them from a live cache it rebuilt), {s.get('disk_tokens', 0)} from disk")


def render(results: dict, args: argparse.Namespace, machine: str) -> str:
    rows = ["| scenario | kvtier TTFT | kvtier % of cold | mlx_lm.server TTFT | mlx_lm.server % of cold |",
            "|---|---:|---:|---:|---:|"]
    kv, ml = results["kvtier"], results["mlx_lm.server"]
    for key, label in [("cold", "cold"), ("warm_repeat", "warm, same request"),
                       ("warm_new_turn", "warm, new question"), ("after_restart", "after restart")]:
        rows.append(f"| {label} | {kv[key]:.3f} s | {100 * kv[key] / kv['cold']:.1f}% "
                    f"| {ml[key]:.3f} s | {100 * ml[key] / ml['cold']:.1f}% |")
    same = "yes" if kv["texts"] == ml["texts"] else "NO"
    return "\n".join([
        f"Measured {time.strftime('%Y-%m-%d')} on {machine}.",
        f"Model: generated llama, hidden 512, 8 layers, float32 (`{results['model']}`); "
        f"prompt {kv['prompt_tokens']} tokens (system prompt with tool definitions + question); "
        f"medians of {args.repeats} for warm rows.",
        f"Command: `{results['command']}`", "",
        *rows, "",
        f"Greedy texts identical between kvtier and mlx_lm.server: {same}. "
        f"kvtier after restart reused {kv['after_restart_cached']} cached prompt tokens{_sources(kv)}.",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=3400, help="system prompt length")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from tests.support.testmodels import make_model

    model = make_model(ROOT / ".models" / "llama", "llama")
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    system = agent_system_prompt(args.prompt_tokens, tokenizer)
    work = Path(tempfile.mkdtemp(prefix="kvtier-bench-"))
    results: dict = {"model": ".models/llama",
               "command": command_line("ttft.py")}
    try:
        for server in (Server.kvtier(model, work / "cache", work / "kvtier.log"),
                       Server.mlx_lm(model, work / "mlx_lm.log")):
            print(f"running {server.name} ...", flush=True)
            results[server.name] = run_server(server, str(model), system, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    section = render(results, args, machine_description())
    print(section)
    if not args.no_docs:
        out = ROOT / "docs" / "bench" / "ttft.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        write_section("ttft", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
