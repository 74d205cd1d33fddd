"""The start-up probe: is batched decode bit-identical to decoding alone on this backend?

A few prompts of different lengths (one past any sliding window) are decoded alone and
joined into one mlx-lm `BatchGenerator` at different steps; batched decode is exact only if
every log-probability of every step is bit-identical. Where it is not, the scheduler also
computes short prompt rests in the batch's pass (`Scheduler.join_rests`): that path is
measured too, and the larger difference reported. `/health` reports the verdict; with
`--exact` a verdict of "not identical" makes requests interleave (kvtier.decode.RowDecoder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generator

import mlx.core as mx
import numpy as np
from mlx_lm.generate import BatchGenerator
from mlx_lm.models import cache as mlx_cache

from . import kvstate, measured
from .decode import greedy, step
from .engine import Engine

PROBE_STEPS = 4  # tokens compared per prompt, the first included: a difference shows from the first
PROBE_VERSION = 3  # part of a kept verdict's key: a change to what the probe measures measures again


@dataclass
class Exactness:
    exact: bool
    reason: str  # why not, or how it was checked
    max_difference: float | None = None  # largest |logprob| difference measured
    recalled: bool = False  # kept from an earlier load's measurement (kvtier/measured.py)


def _key(engine: Engine) -> dict:
    """What the verdict depends on: the model's fingerprint (which names the mlx, mlx-lm,
    device and BLAS computing it), the machine, the probe."""
    return {"measured": "batched decode exactness", "probe": PROBE_VERSION, "fingerprint": engine.fingerprint,
            **measured.machine()}


def recall_exactness(engine: Engine, cache_dir: Path) -> Exactness | None:
    """The verdict an earlier load measured under the same key, or None."""
    kept = measured.recall(cache_dir, _key(engine))
    if kept is None or not isinstance(kept.get("exact"), bool) or not isinstance(kept.get("reason"), str):
        return None
    difference = kept.get("max_difference")
    return Exactness(kept["exact"], f"{kept['reason']} (recalled: measured at an earlier load)",
                     difference if isinstance(difference, (int, float)) else None, recalled=True)


def measure_and_keep(engine: Engine, cache_dir: Path) -> Exactness:
    return keep(engine, cache_dir, measure_exactness(engine))


def keep(engine: Engine, cache_dir: Path, verdict: Exactness) -> Exactness:
    """Remember a measured verdict for later loads (recall_exactness); the verdict."""
    measured.remember(cache_dir, _key(engine), {"exact": verdict.exact, "reason": verdict.reason,
                                                "max_difference": verdict.max_difference})
    return verdict


def unbatchable_reason(engine: Engine) -> str | None:
    """Why mlx-lm cannot batch this model's cache at all, or None."""
    if not engine.reusable:
        return "its prompt cache cannot be stored"
    for layer in kvstate.make_cache(engine.model, engine.quantization):
        if not hasattr(layer, "merge"):
            return f"mlx-lm cannot batch {type(layer).__name__} layers"
    return None


def measure_exactness(engine: Engine) -> Exactness:
    """Decode a few prompts of different lengths alone and joined into one batch at
    different steps; exact only if every log-probability of every step is bit-identical."""
    pieces = measuring(engine)
    while True:
        try:
            next(pieces)
        except StopIteration as done:
            return done.value


def measuring(engine: Engine) -> Generator[None, None, Exactness]:
    """measure_exactness in pieces: it yields after each prompt decoded alone, then returns
    the verdict after the batch, so a daemon probing in its idle time serves the work that
    arrives meanwhile after one piece (a fraction of a second), not after the whole probe."""
    reason = unbatchable_reason(engine)
    if reason:
        return Exactness(False, reason)
    windows = [layer.max_size for layer in kvstate.make_cache(engine.model, engine.quantization)
               if isinstance(layer, mlx_cache.RotatingKVCache)]
    lengths = [5, 37, min(max(windows) + 23, 1024) if windows else 20]
    rng = np.random.default_rng(0)
    vocab = min(engine.vocab_size or 256, 1000)
    prompts = [rng.integers(10, vocab, n).tolist() for n in lengths]
    alone = []
    for prompt in prompts:
        alone.append(_decode_alone(engine, prompt))
        yield
    worst, exact = _compared(_decode_batched(engine, prompts, join_at=[0, 0, 1]), alone)
    if not exact:  # the scheduler then also computes short rests in the batch: their difference too
        yield
        worst = max(worst, _compared(_decode_batched(engine, prompts, join_at=[0, 0, 1], rests=True), alone)[0])
    mx.clear_cache()
    if exact:
        return Exactness(True, f"batched decode measured bit-identical at start-up ({len(prompts)} prompts)", 0.0)
    return Exactness(False, f"batched decode differs from decoding alone on this backend "
                            f"(max |logprob difference| {worst:.3g})", worst)


def _compared(together: list[list[mx.array]], alone: list[list[mx.array]]) -> tuple[float, bool]:
    """The largest |difference| of any log-probability, and whether all are bit-identical."""
    worst, exact = 0.0, True
    for mine, theirs in zip(together, alone):
        for a, b in zip(mine, theirs):
            worst = max(worst, float(mx.max(mx.abs(a - b)).item()))
            exact &= bool(mx.array_equal(a, b).item())
    return worst, exact


def _prefilled(engine: Engine, tokens: list[int]) -> list[Any]:
    prompt_cache = kvstate.make_cache(engine.model, engine.quantization)
    engine.model(mx.array(tokens[:-1])[None], cache=prompt_cache)
    mx.eval(kvstate.state_arrays(prompt_cache))
    return prompt_cache


def _decode_alone(engine: Engine, tokens: list[int]) -> list[mx.array]:
    """The first token and the steps after it, each a one-row pass (decode.step)."""
    prompt_cache, token, out = _prefilled(engine, tokens), tokens[-1], []
    for _ in range(PROBE_STEPS):
        y, logprobs = step(engine.model, mx.array([token]), prompt_cache, greedy)
        out.append(logprobs[0])
        token = int(y.item())
    return out


def _decode_batched(engine: Engine, prompts: list[list[int]], join_at: list[int],
                    rests: bool = False) -> list[list[mx.array]]:
    """`rests`: each prompt joins whole, over an empty cache (as `join_rests` joins a short
    rest); else prefilled alone, joining with its last token."""
    generator = BatchGenerator(engine.model, stop_tokens=[], completion_batch_size=len(prompts))
    out: dict[int, list[mx.array]] = {}
    uids: list[int] = []
    try:
        for at in range(PROBE_STEPS + max(join_at) + 1):  # a joiner's first token comes a call later
            for i in (i for i, joins in enumerate(join_at) if joins == at):
                # As the scheduler joins a request: the prompt it has not computed, its first token to come.
                held = 0 if rests else len(prompts[i]) - 1
                cache = kvstate.make_cache(engine.model, engine.quantization) if rests else _prefilled(engine, prompts[i])
                (uid,) = generator.insert([prompts[i][held:]], max_tokens=[PROBE_STEPS], caches=[cache],
                                          all_tokens=[prompts[i][:held]])
                uids.append(uid)
                out[uid] = []
            for response in generator.next()[1]:
                out[response.uid].append(response.logprobs)
    finally:
        generator.close()
    return [out[uid] for uid in uids]
