"""The prefill chunks: their size at each depth, from the model's measured prefill speed.

While a cold prompt prefills, requests that are decoding wait for one chunk between two of
their tokens, so a chunk should take at most TARGET_SECONDS; fewer, larger chunks cost the
prefilling request less. A chunk's time grows with the depth it is computed at (attention
reads every key before it), so the engine times a small chunk when it loads, at depth 0 and
over PROBE_DEPTHS' random keys and values, fits seconds per chunk against depth, and cuts
each chunk at the largest size that fits the target at its depth: whole blocks near the
start, down to a fraction of a block deep in a long prompt (a 128-token chunk at depth 8K
took 1 s on a small model on this 2-core CPU).

Where a prompt is cut is part of its arithmetic (docs/benchmarks.md, "Prefill chunk
boundaries change the numbers"), so the cuts depend on positions only, never on the load of
the moment or on the neighbours: a chunk of size s starts at a multiple of s, and sizes are
block multiples or divide the block, so a prefix restored at a block boundary is cut where
a cold prompt is. The fit is made once per model and machine and kept in the cache
directory (kvtier/chunk_memory.py): a restart cuts where the last process did, without the
probe; `--prefill-step-size N` fixes one size instead.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache, make_prompt_cache

from .kvstate import state_arrays

log = logging.getLogger("kvtier.chunking")

TARGET_SECONDS = 0.3  # a decoding stream's stall target is 0.5 s: a chunk, a decode step, the text's way out (0.4 measured 0.6-0.8 s)
REFERENCE_DEPTH = 8192  # tokens: a long agent prompt, where /health reports the chunk
PROBE_DEPTHS = (0, 2048)  # where the start-up probe times a chunk
PROBE_REPEATS = 2  # timings a depth: the fastest counts (another process's burst counts less)
PROBE_TOKENS = 64  # the chunk it times: small, so the probe is short; big enough to scale from
MAX_TOKENS = 2048  # the largest chunk: mlx-lm's own default
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
    recalled: bool = False  # the fit was measured at an earlier load (kvtier/chunk_memory.py), not now

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
    """The chunk the start-up probe times: the smallest candidate of PROBE_TOKENS or more."""
    return next((size for size in sizes if size >= PROBE_TOKENS), sizes[-1])


def measure(model: Any, tokens: int, depths: tuple[int, ...] = PROBE_DEPTHS, repeats: int = PROBE_REPEATS,
            target: float = TARGET_SECONDS) -> ChunkFit:
    """Time a chunk of `tokens` at each depth (the fastest of `repeats`) and fit a line. A
    depth is random keys and values, not computed ones (a chunk's cost is timed, not its
    numbers), so the probe costs a few chunks, not a prefill: a model loaded on demand
    makes its first request wait for it. Stops after depth 0 when that chunk alone is slower
    than the target (the fit is then flat: only the sizes below it can fit)."""
    ids = mx.arange(tokens, dtype=mx.int32)[None] % 64 + 1  # token ids every vocabulary has
    timed: list[int] = []
    seconds: list[float] = []
    for depth in depths:
        cache = make_prompt_cache(model)
        model(ids[:, :16], cache=cache)  # every layer's shapes, and one-time set-up
        if not depth:
            model(ids, cache=cache)  # not timed: a chunk's one-time set-up
        elif not _deepen(cache, depth, room=tokens * repeats):
            break  # nothing in the cache grows with depth: the cost is flat
        mx.eval(state_arrays(cache))
        timed.append(depth)
        seconds.append(min(_timed_chunk(model, ids, cache) for _ in range(repeats)))
        if seconds[0] > target:
            break
    return _fit_line(tokens, timed, seconds)


def _timed_chunk(model: Any, ids: mx.array, cache: list[Any]) -> float:
    began = time.perf_counter()
    model(ids, cache=cache)
    mx.eval(state_arrays(cache))
    return time.perf_counter() - began


def _deepen(cache: list[Any], depth: int, room: int) -> int:
    """Fill every plain KV layer to `depth` tokens of random keys and values (a fixed key: the
    process's random stream is left alone), in buffers with `room` tokens to spare (the timed
    chunks then grow none); the layers it filled. Recurrent state does not grow with depth,
    sliding windows stop growing: those stay as they are."""
    key, filled = mx.random.key(0), 0
    for layer in cache:
        if type(layer) is KVCache and layer.keys is not None:
            keys, values = layer.keys, layer.values
            layer.keys = mx.random.normal((*keys.shape[:2], depth + room, keys.shape[3]), key=key).astype(keys.dtype)
            layer.values = mx.random.normal((*values.shape[:2], depth + room, values.shape[3]), key=key).astype(values.dtype)
            layer.offset = depth
            filled += 1
    return filled


def _fit_line(tokens: int, depths: list[int], seconds: list[float]) -> ChunkFit:
    """Theil-Sen: the median of the pairwise slopes and of the intercepts they leave, so a
    chunk slowed by another process's burst moves the line little. Never below flat."""
    pairs = [(seconds[j] - seconds[i]) / (depths[j] - depths[i])
             for i in range(len(depths)) for j in range(i + 1, len(depths)) if depths[j] != depths[i]]
    if not pairs:
        return ChunkFit(tokens, min(seconds), 0.0, len(depths))
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
    chunk = from_fit(fit, sizes, probe_seconds=round(time.perf_counter() - began, 3))
    log.info("prefill chunks of %d tokens at depth 0, %d at depth %d (~%.2f s each; measured in %.1f s)",
             chunk.tokens, chunk.tokens_at_reference, REFERENCE_DEPTH, chunk.seconds_at_reference,
             chunk.probe_seconds)
    return chunk


def from_fit(fit: ChunkFit, sizes: list[int], probe_seconds: float | None = None,
             recalled: bool = False) -> PrefillChunk:
    """The measured cuts of a fit over the candidate `sizes` (just timed, or recalled)."""
    deep = largest_fitting(fit, sizes, REFERENCE_DEPTH)
    return PrefillChunk(largest_fitting(fit, sizes, 0), "measured", round(fit.seconds(deep, REFERENCE_DEPTH), 3),
                        probe_seconds=probe_seconds, tokens_at_reference=deep, fit=fit, sizes=tuple(sizes),
                        recalled=recalled)
