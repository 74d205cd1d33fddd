"""Rendering and tokenizing an agent's prompt turn after turn (kvtier.prompt's Renderer.render,
what the routes call before a request reaches the MLX thread): the chat template, the
tokenizer and, for models with snapshot layers, the message ends. Each prompt tokenized whole
(as before kvtier.tokcache) against incrementally (only what is new since the last turn).

The prompts: a coding agent's system prompt of tool definitions (~`--tokens` long), then
either a conversation's turns (each adds an assistant tool call, its result and a user
message) or a new question each time on the same system prompt (bench/steps.py's warm
requests). Each prompt is a new text (a repeated one would be a plain lookup). Every variant runs the whole conversation on a
fresh Renderer `--repeats` times; the median per turn, then the median over the turns after
the first (warm) and the first alone (cold). Checks the two ways give the same tokens.

    python bench/render.py [--tokens 16384] [--turns 12] [--repeats 5]

Against another checkout (the code before kvtier.tokcache, say), run it from there: a Renderer
without `incremental` is timed in both columns."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT  # noqa: E402
from prompts import QUESTIONS, agent_system_prompt  # noqa: E402


def conversation(system: str, turns: int) -> list[list[dict]]:
    """The prompt's messages at each turn: each adds a tool call, its result and a question."""
    messages: list[dict] = [{"role": "system", "content": system}, {"role": "user", "content": "Find the block size."}]
    out = [messages]
    for turn in range(1, turns):
        messages = messages + [
            {"role": "assistant", "content": f"Step {turn}: searching.", "tool_calls": [
                {"type": "function", "function": {"name": "grep", "arguments": {"pattern": f"block_{turn}"}}}]},
            {"role": "tool", "content": f"kvtier/config.py:{turn}: block_size = 128  # tokens\n" * 3},
            {"role": "user", "content": f"Good. Now check  module {turn} — ünïcode too.\n"}]
        out.append(messages)
    return out


def new_questions(system: str, count: int) -> list[list[dict]]:
    return [[{"role": "system", "content": system},
             {"role": "user", "content": f"{QUESTIONS[1]} Attempt {i + 1}."}] for i in range(count)]


def run(tokenizer, prompts: list[list[dict]], boundaries: bool, incremental: bool) -> list[float]:
    """Seconds to render each prompt, on a fresh Renderer."""
    from kvtier.prompt import Renderer

    renderer = Renderer(tokenizer, boundaries)
    if not incremental:
        renderer.incremental = None  # every prompt tokenized whole
    times = []
    for messages in prompts:
        started = time.perf_counter()
        renderer.render(messages)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--turns", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from mlx_lm.utils import load_tokenizer

    from kvtier.prompt import Renderer
    from tests.support.testmodels import make_model

    tokenizer = load_tokenizer(make_model(ROOT / ".models" / "llama", "llama"))
    system = agent_system_prompt(args.tokens - 80 * args.turns, tokenizer)
    print(f"median of {args.repeats} runs, ms per render")
    print("| prompts | message ends | tokenized | first | later (median) |")
    print("|---|---|---|---:|---:|")
    for name, prompts in (("conversation", conversation(system, args.turns)),
                          ("new questions", new_questions(system, args.turns))):
        whole, incremental = Renderer(tokenizer, True), Renderer(tokenizer, True)
        whole.incremental = None
        for messages in prompts:
            assert whole.render(messages) == incremental.render(messages)
        lengths = [len(whole.render(m)[0]) for m in (prompts[0], prompts[-1])]
        label = f"{name}, {lengths[0]:,} to {lengths[-1]:,} tokens"
        for boundaries in (False, True):
            for mode in (False, True):
                runs = [run(tokenizer, prompts, boundaries, mode) for _ in range(args.repeats)]
                per_turn = [statistics.median(r[i] for r in runs) for i in range(len(prompts))]
                print(f"| {label} | {'yes' if boundaries else 'no'} | {'incrementally' if mode else 'whole'} | "
                      f"{per_turn[0] * 1e3:.1f} | {statistics.median(per_turn[1:]) * 1e3:.2f} |")

if __name__ == "__main__":
    main()
