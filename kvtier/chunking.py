"""The prefill chunks: their size at each depth, from the model's measured prefill speed.

While a cold prompt prefills, requests that are decoding wait for one chunk between two of
their tokens, so a chunk should take at most TARGET_SECONDS; fewer, larger chunks cost the
prefilling request less. A chunk's time grows with the depth it is computed at (attention
reads every key before it), so the engine times a short prefill when it loads (chunks of one
block, from depth 0 to PROBE_DEPTH), fits seconds per chunk against depth, and cuts each
chunk at the largest size that fits the target at its depth: whole blocks near the start,
down to a fraction of a block deep in a long prompt (a 128-token chunk at depth 8K took 1 s
on a small model on this 2-core CPU).

Where a prompt is cut is part of its arithmetic (docs/benchmarks.md, "Prefill chunk
boundaries change the numbers"), so the cuts depend on positions only, never on the load of
the moment or on the neighbours: a chunk of size s starts at a multiple of s, and sizes are
block multiples or divide the block, so a prefix restored at a block boundary is cut where
a cold prompt is. The fit is made once per process; `--prefill-step-size N` fixes one size
instead.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from .kvstate import state_arrays

log = logging.getLogger("kvtier.chunking")

TARGET_SECONDS = 0.3  # a decoding stream's stall target is 0.5 s: a chunk, a decode step, the text's way out (0.4 measured 0.6-0.8 s)
REFERENCE_DEPTH = 8192  # tokens: a long agent prompt, where /health reports the chunk
PROBE_DEPTH = 1024  # tokens timed at start-up: enough for the line (a first load on demand waits for it)
PROBE_BUDGET = 3.0  # seconds: a big model on a slow machine stops early (two chunks at least)
MIN_TOKENS, MAX_TOKENS = 128, 2048  # whole-block sizes; smaller chunks are fractions of a block
MIN_PART_TOKENS = 16  # the smallest fraction of a block a deep chunk is cut to
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
    """Where the engine cuts a prefill, and how that was decided (`/health`). Measured: the
    size at a depth is the largest candidate the fit says takes at most `target` seconds
    there; fixed (`--prefill-step-size`, the fallback): `tokens` at every depth."""

    tokens: int  # the chunk at depth 0 (the one size when fixed)
    chosen: str  # "measured", "--prefill-step-size" or "fallback"
    seconds_at_reference: float | None = None  # the chunk cut at REFERENCE_DEPTH: its predicted time
    reference_depth: int = REFERENCE_DEPTH
    probe_seconds: float | None = None  # the start-up measurement's own time
    tokens_at_reference: int | None = None  # the chunk cut at REFERENCE_DEPTH
    fit: ChunkFit | None = None
    sizes: tuple[int, ...] = ()  # the candidates, smallest first
    target: float = TARGET_SECONDS

    def size_at(self, depth: int) -> int:
        if self.fit is None:
            return self.tokens
        return largest_fitting(self.fit, self.sizes, depth, self.target)

    def next_cut(self, position: int) -> int:
        """The end of the chunk that starts at `position`: the next multiple of its size."""
        size = self.size_at(position)
        return (position // size + 1) * size

    def share(self, tokens: int, depth: int) -> float:
        """The part of one scheduler step a chunk of `tokens` at `depth` takes (1.0: a whole step)."""
        if self.fit is None:
            return tokens / self.tokens
        return self.fit.seconds(tokens, depth) / self.target

    def describe(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if key not in ("fit", "sizes", "target")}


def chunk_sizes(block_size: int) -> list[int]:
    """The candidate sizes, smallest first: the block times powers of two up to MAX_TOKENS (or
    the one block when larger), and the block's halves, quarters... down to MIN_PART_TOKENS.
    Each size divides the larger ones, so cuts at multiples of a size nest."""
    sizes = [block_size]
    while sizes[-1] * 2 <= MAX_TOKENS:
        sizes.append(sizes[-1] * 2)
    part = block_size
    while part % 2 == 0 and part // 2 >= MIN_PART_TOKENS:
        part //= 2
        sizes.insert(0, part)
    return sizes


def largest_fitting(fit: ChunkFit, sizes: tuple[int, ...] | list[int], depth: int, target: float = TARGET_SECONDS) -> int:
    """The largest size whose chunk at `depth` takes at most `target` (the smallest if none does)."""
    return max((size for size in sizes if fit.seconds(size, depth) <= target), default=sizes[0])


def probe_tokens(sizes: list[int]) -> int:
    """The chunk the start-up probe times: the smallest candidate of a whole default block or more."""
    return next((size for size in sizes if size >= MIN_TOKENS), sizes[-1])


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


def choose(model: Any, block_size: int, given: int | PrefillChunk | None) -> PrefillChunk:
    """`given` when it is a size (`--prefill-step-size N`) or an earlier choice (a reload keeps
    its first load's); else measured on `model` now."""
    if isinstance(given, PrefillChunk):
        return given
    if given is not None:
        return PrefillChunk(given, "--prefill-step-size")
    sizes = chunk_sizes(block_size)
    began = time.perf_counter()
    try:
        fit = measure(model, probe_tokens(sizes))
    except Exception as exc:  # a model the plain probe cannot run: mlx-lm's default
        log.warning("measuring the prefill speed failed (%s); prefill chunks of %d tokens", exc, FALLBACK_TOKENS)
        return PrefillChunk(FALLBACK_TOKENS, "fallback")
    deep = largest_fitting(fit, sizes, REFERENCE_DEPTH)
    chunk = PrefillChunk(largest_fitting(fit, sizes, 0), "measured", round(fit.seconds(deep, REFERENCE_DEPTH), 3),
                         probe_seconds=round(time.perf_counter() - began, 3), tokens_at_reference=deep, fit=fit,
                         sizes=tuple(sizes))
    log.info("prefill chunks of %d tokens at depth 0, %d at depth %d (~%.2f s each; measured in %.1f s)",
             chunk.tokens, deep, REFERENCE_DEPTH, chunk.seconds_at_reference, chunk.probe_seconds)
    return chunk
