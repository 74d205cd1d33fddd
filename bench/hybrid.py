"""A hybrid model (Qwen3-Next: gated-delta linear attention + full attention) over the
demo's multi-turn agent session, kvtier vs mlx_lm.server, side by side.

    python bench/hybrid.py      (writes docs/bench/hybrid.json and a section of docs/benchmarks.md)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from harness import ROOT, Server, machine_description, run_session, write_section
from prompts import agent_system_prompt
from tests.support.testmodels import make_model


def reference_texts(model: Path, results, max_tokens: int) -> list[str]:
    """Plain mlx-lm, no server and no cache, on the exact messages kvtier was sent."""
    import mlx_lm

    loaded, tokenizer = mlx_lm.load(str(model))
    return [mlx_lm.generate(loaded, tokenizer, max_tokens=max_tokens,
                            prompt=tokenizer.apply_chat_template(t.messages, add_generation_prompt=True))
            for _, t in results]


def summarise(results) -> dict:
    prompt = sum(t.usage.get("prompt_tokens", 0) for _, t in results)
    cached = sum((t.usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0 for _, t in results)
    return {"ttft": [round(t.ttft, 3) for _, t in results], "total_ttft": sum(t.ttft for _, t in results),
            "prompt_tokens": prompt, "cached_tokens": cached, "texts": [t.text for _, t in results],
            "labels": [s.label for s, _ in results]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="qwen3_next")
    parser.add_argument("--system-tokens", type=int, default=2000)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    model = make_model(ROOT / ".models" / args.arch, args.arch)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    systems = {name: agent_system_prompt(args.system_tokens, tokenizer, project=name, seed=i)
               for i, name in enumerate(["webshop", "compiler"])}
    work = Path(tempfile.mkdtemp(prefix="kvtier-hybrid-"))
    try:
        kv_results = run_session(Server.kvtier(model, work / "cache", work / "kvtier.log"),
                                 str(model), systems, 16)
        kv = summarise(kv_results)
        ml = summarise(run_session(Server.mlx_lm(model, work / "mlx.log"), str(model), systems, 16))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    reference = reference_texts(model, kv_results, 16)
    exact = sum(a == b for a, b in zip(kv["texts"], reference))
    rows = ["| # | request | kvtier TTFT | mlx_lm.server TTFT |", "|---:|---|---:|---:|"]
    rows += [f"| {i} | {label} | {a:.2f} s | {b:.2f} s |"
             for i, (label, a, b) in enumerate(zip(kv["labels"], kv["ttft"], ml["ttft"]), 1)]
    section = "\n".join([
        f"Measured {time.strftime('%Y-%m-%d')} on {machine_description()}.",
        f"Model: generated `{args.arch}` (`.models/{args.arch}`), float32. Session: the `make demo` "
        f"agent session (2 projects with ~{args.system_tokens}-token system prompts, tool results, "
        "a server restart after request 4, a project switch). "
        f"Command: `python bench/hybrid.py {' '.join(sys.argv[1:])}`".strip(), "", *rows, "",
        f"Total TTFT: kvtier {kv['total_ttft']:.2f} s, mlx_lm.server {ml['total_ttft']:.2f} s. "
        f"Prompt tokens reused: kvtier {kv['cached_tokens']} of {kv['prompt_tokens']} "
        f"({100 * kv['cached_tokens'] / kv['prompt_tokens']:.0f}%). "
        f"kvtier's greedy texts identical to plain `mlx_lm.generate` on the same messages: "
        f"{exact} of {len(reference)}. Identical to mlx_lm.server's: "
        f"{'yes' if kv['texts'] == ml['texts'] else 'no (see below)'}."])
    print(section)
    out = ROOT / "docs" / "bench" / "hybrid.json"
    out.write_text(json.dumps({"kvtier": kv, "mlx_lm.server": ml, "mlx_lm.generate": reference}, indent=2))
    write_section("hybrid", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
