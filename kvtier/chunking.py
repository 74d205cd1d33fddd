"""The prefill chunk size: chosen once per process from the model's measured prefill speed.

While a cold prompt prefills, requests that are decoding wait for one chunk between two of
their tokens, so a chunk should take at most TARGET_SECONDS; fewer, larger chunks cost the
prefilling request less. A chunk's time grows with the depth it is computed at (attention
reads every key before it), so the engine times a short prefill when it loads (chunks of the
smallest size, from depth 0 to PROBE_DEPTH), fits seconds per chunk against depth, and takes
the largest block multiple in [MIN_TOKENS, MAX_TOKENS] whose chunk at REFERENCE_DEPTH fits.

The size is fixed for the process, never changed while serving: where a prompt is cut is
part of its arithmetic (docs/benchmarks.md, "Prefill chunk boundaries change the numbers"),
so a request's chunks must not depend on its neighbours or on the load of the moment.
`--prefill-step-size N` fixes it instead.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from .kvstate import state_arrays

log = logging.getLogger("kvtier.chunking")

TARGET_SECONDS = 0.3  # a decoding stream's stall target is 0.5 s: a chunk, a decode step, the text's way out (0.4 measured 0.6-0.8 s)
REFERENCE_DEPTH = 8192  # tokens: a long agent prompt; chunks deeper than this take longer
PROBE_DEPTH = 2048  # tokens timed at start-up
PROBE_BUDGET = 5.0  # seconds: a big model on a slow machine stops early (two chunks at least)
MIN_TOKENS, MAX_TOKENS = 128, 2048  # one default block: a big model at depth 8K needs it
FALLBACK_TOKENS = 2048  # mlx-lm's own default, when the probe cannot run


@dataclass(frozen=True)
class ChunkFit:
    """Seconds one chunk of `tokens` takes at depth d: intercept + slope * d."""

    tokens: int
    intercept: float
    slope: float
    points: int = 0  # chunks timed

    def seconds(self, tokens: int, depth: int) -> float:
        """A chunk of `tokens` at `depth`: linear in its size, its middle's depth on the fit."""
        middle = depth + (tokens - self.tokens) / 2
        return tokens / self.tokens * (self.intercept + self.slope * middle)


@dataclass(frozen=True)
class PrefillChunk:
    """What the engine prefills per forward pass, and how that was decided (`/health`)."""

    tokens: int
    chosen: str  # "measured", "--prefill-step-size" or "fallback"
    seconds_at_reference: float | None = None  # a chunk's predicted time at REFERENCE_DEPTH
    reference_depth: int = REFERENCE_DEPTH
    probe_seconds: float | None = None  # the start-up measurement's own time

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def block_multiples(block_size: int) -> list[int]:
    """The candidate sizes, smallest first: block multiples in [MIN_TOKENS, MAX_TOKENS] (the
    one block multiple nearest the range when none is inside it)."""
    low = math.ceil(MIN_TOKENS / block_size) * block_size
    high = max(low, MAX_TOKENS // block_size * block_size)
    return list(range(low, high + 1, block_size))


def pick(fit: ChunkFit, block_size: int, target: float = TARGET_SECONDS, depth: int = REFERENCE_DEPTH) -> int:
    """The largest candidate whose chunk at `depth` takes at most `target` (the smallest if none does)."""
    candidates = block_multiples(block_size)
    fitting = [c for c in candidates if fit.seconds(c, depth) <= target]
    return max(fitting, default=candidates[0])


def measure(model: Any, tokens: int, depth: int = PROBE_DEPTH, budget: float = PROBE_BUDGET,
            target: float = TARGET_SECONDS) -> ChunkFit:
    """Time chunks of `tokens` prefilled from depth 0 to `depth` in a fresh cache; fit a line.
    Stops early past `budget` seconds, or after one chunk slower than the target (the
    smallest size is then the answer whatever the slope).

    One small forward first, so one-time set-up does not count."""
    ids = mx.arange(tokens, dtype=mx.int32)[None] % 64 + 1  # token ids every vocabulary has
    warm = make_prompt_cache(model)
    model(ids[:, :16], cache=warm)
    mx.eval(state_arrays(warm))
    cache = make_prompt_cache(model)
    depths, seconds = [], []
    for at in range(0, max(depth, 2 * tokens), tokens):
        began = time.perf_counter()
        model(ids, cache=cache)
        mx.eval(state_arrays(cache))
        depths.append(at)
        seconds.append(time.perf_counter() - began)
        if seconds[0] > target or (len(seconds) >= 2 and sum(seconds) > budget):
            break
    return _fit_line(tokens, depths, seconds)


def _fit_line(tokens: int, depths: list[int], seconds: list[float]) -> ChunkFit:
    """Theil-Sen: the median of the pairwise slopes and of the intercepts they leave, so a
    chunk slowed by another process's burst moves the line little. Never below flat."""
    if len(depths) < 2:
        return ChunkFit(tokens, seconds[0], 0.0, 1)
    pairs = [(seconds[j] - seconds[i]) / (depths[j] - depths[i])
             for i in range(len(depths)) for j in range(i + 1, len(depths))]
    slope = max(0.0, statistics.median(pairs))
    intercept = statistics.median(s - slope * d for d, s in zip(depths, seconds))
    return ChunkFit(tokens, max(intercept, min(seconds) / 2), slope, len(depths))


def choose(model: Any, block_size: int, fixed: int | None) -> PrefillChunk:
    """`fixed` when given (`--prefill-step-size N`); else measured on `model` now."""
    if fixed is not None:
        return PrefillChunk(fixed, "--prefill-step-size")
    began = time.perf_counter()
    try:
        fit = measure(model, block_multiples(block_size)[0])
    except Exception as exc:  # a model the plain probe cannot run: mlx-lm's default
        log.warning("measuring the prefill speed failed (%s); prefill chunks of %d tokens", exc, FALLBACK_TOKENS)
        return PrefillChunk(FALLBACK_TOKENS, "fallback")
    tokens = pick(fit, block_size)
    chunk = PrefillChunk(tokens, "measured", round(fit.seconds(tokens, REFERENCE_DEPTH), 3),
                         probe_seconds=round(time.perf_counter() - began, 3))
    log.info("prefill chunks of %d tokens: one takes ~%.2f s at depth %d (measured in %.1f s)",
             tokens, chunk.seconds_at_reference, REFERENCE_DEPTH, chunk.probe_seconds)
    return chunk
