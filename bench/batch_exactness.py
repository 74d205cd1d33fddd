"""Is mlx-lm's batched decode bit-exact against decoding alone, per architecture?

For each generated architecture: a few prompts of different lengths, each prefilled alone
into its own prompt cache (as the daemon does after restoring from the tiers), then joined
into one mlx-lm `BatchGenerator` at different steps. Every step's log-probabilities are
compared bitwise with `mlx_lm.generate_step` on the same prompt alone, and the greedy texts
with `mlx_lm.generate`. Prints a markdown table (docs/architecture.md keeps a copy).

    python bench/batch_exactness.py [--tokens 24] [--arches llama,sliding]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
from mlx_lm.generate import BatchGenerator, generate_step
from mlx_lm.models.cache import make_prompt_cache

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.testmodels import ARCHES, make_model  # noqa: E402

PROMPTS = [
    "You are a careful coding agent. List the files in the project and explain each one.",
    "Run the tests.",
    "Summarise the README for a new contributor, then suggest three first issues to work on "
    "and say which files each touches. Keep it short and precise, one line per issue.",
    "Why does test_total fail with assert 41 == 42?",
]
JOIN_AT = [0, 0, 3, 7]  # decode step at which each prompt joins the batch


def alone(model, tokens: list[int], n: int) -> list[tuple[int, mx.array]]:
    out = []
    for token, logprobs in generate_step(mx.array(tokens), model, max_tokens=n):
        out.append((int(token), logprobs))
    return out


def prefilled(model, tokens: list[int]) -> list:
    cache = make_prompt_cache(model)
    model(mx.array(tokens[:-1])[None], cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def batched(model, prompts: list[list[int]], n: int) -> dict[int, list[tuple[int, mx.array]]]:
    gen = BatchGenerator(model, max_tokens=n, stop_tokens=[])
    results: dict[int, list] = {}
    uid_of: dict[int, int] = {}
    step = 0
    while len(uid_of) < len(prompts) or gen._generation_batch.uids or gen._unprocessed_sequences:
        for i, (p, at) in enumerate(zip(prompts, JOIN_AT)):
            if at == step and i not in uid_of:
                (uid,) = gen.insert([p[-1:]], max_tokens=[n], caches=[prefilled(model, p)],
                                    all_tokens=[p[:-1]])
                uid_of[i] = uid
                results[uid] = []
        for r in gen.next_generated():
            results[r.uid].append((r.token, r.logprobs))
        step += 1
    gen.close()
    return {i: results[uid] for i, uid in uid_of.items()}


def measure(arch: str, n: int) -> dict:
    path = make_model(ROOT / ".models" / arch, arch)
    model, tokenizer = mlx_lm.load(str(path))
    prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                  add_generation_prompt=True)) for p in PROMPTS]
    got = batched(model, prompts, n)
    worst, same_tokens, bitwise = 0.0, True, True
    texts = set()
    for i, p in enumerate(prompts):
        ref = alone(model, p, n)
        ref_text = mlx_lm.generate(model, tokenizer, prompt=p, max_tokens=n)
        texts.add(ref_text)
        tokens = [t for t, _ in got[i]]
        # Tokens, not texts: mlx_lm.generate's streaming detokenizer drops a leading space
        # that tokenizer.decode keeps.
        same_tokens &= tokens == [t for t, _ in ref]
        for (_, a), (_, b) in zip(got[i], ref):
            diff = float(mx.max(mx.abs(a - b)).item())
            worst = max(worst, diff)
            bitwise &= bool(mx.array_equal(a, b).item())
    cache_types = sorted({type(c).__name__ for c in make_prompt_cache(model)})
    return {"arch": arch, "caches": "+".join(cache_types), "bitwise": bitwise, "max_diff": worst,
            "tokens_equal": same_tokens, "distinct_texts": len(texts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--arches", default=",".join(ARCHES))
    args = parser.parse_args()
    print(f"backend: {mx.default_device()}, {len(PROMPTS)} prompts joined at steps {JOIN_AT}, "
          f"{args.tokens} tokens each\n")
    print("| architecture | layer caches | logprobs bit-identical | max abs difference | greedy tokens equal |")
    print("| --- | --- | --- | --- | --- |")
    for arch in args.arches.split(","):
        r = measure(arch, args.tokens)
        print(f"| {r['arch']} | {r['caches']} | {'yes' if r['bitwise'] else 'no'} | {r['max_diff']:.3g} "
              f"| {'yes' if r['tokens_equal'] else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
