"""Part 4: decode tokens/s in-process, kvtier's Engine against mlx_lm.stream_generate on the
same prompt, in interleaved pairs of runs."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from harness import log
from prompts import QUESTIONS, agent_system_prompt, messages_for


def time_mlx_lm(model, tokenizer, prompt: list[int], max_tokens: int) -> dict:
    from mlx_lm import stream_generate

    first = last = 0.0
    response, parts = None, []
    for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        last = time.perf_counter()
        first = first or last
        parts.append(response.text)
    assert response is not None, "mlx-lm generated nothing"
    tokens = response.generation_tokens
    return {"tokens": tokens, "finish": response.finish_reason, "seconds": last - first,
            "tps": (tokens - 1) / (last - first), "reported_tps": response.generation_tps,
            "text": "".join(parts)}


def time_engine(engine, prompt: list[int], max_tokens: int) -> dict:
    from kvtier.requests import GenerationRequest
    from kvtier.scheduler import generate

    first = last = 0.0
    chunk, parts = None, []
    for chunk in generate(engine, GenerationRequest(list(prompt), max_tokens, temperature=0.0)):
        last = time.perf_counter()
        first = first or last
        parts.append(chunk.text)
    engine.store.flush()  # its background disk writes must not overlap the next timing
    assert chunk is not None and chunk.usage is not None  # the last chunk carries the usage
    tokens = chunk.usage.completion_tokens
    return {"tokens": tokens, "finish": chunk.finish_reason, "seconds": last - first,
            "tps": (tokens - 1) / (last - first), "text": "".join(parts)}


def pick_decode_prompt(engine, model, tokenizer, max_tokens: int, attempts: int = 6) -> tuple[list[int], int]:
    """A ~1K-token prompt on which greedy decoding does not hit EOS before max_tokens (this
    run doubles as mlx-lm's warm-up)."""
    for seed in range(attempts):
        system = agent_system_prompt(1000, engine.tokenizer, project=f"decode{seed}", seed=100 + seed,
                                     step=1)
        prompt = engine.renderer.chat_tokens(messages_for(system, QUESTIONS[seed % len(QUESTIONS)]))
        if time_mlx_lm(model, tokenizer, prompt, max_tokens)["tokens"] == max_tokens:
            return prompt, seed
    raise RuntimeError(f"every candidate prompt stopped at EOS before {max_tokens} tokens")


def run_decode(model_path: Path, max_tokens: int, repeats: int, work: Path) -> dict:
    log(f"part 4: decode tokens/s, {max_tokens} greedy tokens, in-process")
    from mlx_lm import load

    from kvtier.config import CacheConfig
    from kvtier.engine import Engine

    model, tokenizer = load(str(model_path))
    engine = Engine(str(model_path), CacheConfig(cache_dir=work / "decode-cache"))
    try:
        prompt, seed = pick_decode_prompt(engine, model, tokenizer, max_tokens)
        time_engine(engine, prompt, 8)  # warm-up
        mlx_runs, engine_runs = [], []
        for _ in range(repeats):  # interleaved, so background load hits both alike
            mlx_runs.append(time_mlx_lm(model, tokenizer, prompt, max_tokens))
            engine_runs.append(time_engine(engine, prompt, max_tokens))
    finally:
        engine.close()
    mlx_tps = statistics.median(r["tps"] for r in mlx_runs)
    engine_tps = statistics.median(r["tps"] for r in engine_runs)
    # Other load shifts both runs of a pair alike: the median of paired ratios resists it best.
    ratio = statistics.median(e["tps"] / m["tps"] for m, e in zip(mlx_runs, engine_runs))
    return {"prompt_tokens": len(prompt), "prompt_seed": seed, "max_tokens": max_tokens, "repeats": repeats,
            "mlx_lm": mlx_runs, "kvtier": engine_runs, "mlx_lm_tps": mlx_tps, "kvtier_tps": engine_tps,
            "ratio": ratio,
            "same_token_counts": all(r["tokens"] == max_tokens for r in mlx_runs + engine_runs),
            "identical_texts": len({r["text"] for r in mlx_runs + engine_runs}) == 1}
