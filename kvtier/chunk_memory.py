"""The prefill chunks' fit (kvtier/chunking.py) kept across processes in the cache directory
(kvtier/measured.py): a restart, or a model's first load after a daemon measured it at
start-up, recalls the fit instead of timing the model again, so its cuts stay the same from one
process to the next and no request waits for the probe.

The key is the model's files (its fingerprint without the KV settings: the probe times plain
mlx-lm caches), the machine, the block size (the candidate sizes come from it) and what the
probe measures; the candidates are rebuilt from the block size at each recall."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from . import chunking, measured
from .blocks import model_fingerprint, runtime

log = logging.getLogger("kvtier.chunking")

PROBE_VERSION = 1  # part of the key: a change to what the probe measures measures again


def _key(model_path: Path, block_size: int) -> dict[str, Any]:
    return {"measured": "prefill chunk fit", "probe": PROBE_VERSION,
            "fingerprint": model_fingerprint(model_path, "any", block_size, "prefill", runtime()),
            "target_seconds": chunking.TARGET_SECONDS, "probe_tokens": chunking.PROBE_TOKENS,
            "probe_depths": list(chunking.PROBE_DEPTHS), "probe_repeats": chunking.PROBE_REPEATS,
            **measured.machine()}


@dataclass(frozen=True)
class FitMemory:
    """Where one model's fit is kept: the cache directory and its key (the model's files
    hashed once, for both the recall and the keep)."""

    cache_dir: Path
    block_size: int
    key: dict[str, Any]

    @classmethod
    def of(cls, model_path: Path, cache_dir: Path, block_size: int) -> FitMemory:
        return cls(cache_dir, block_size, _key(model_path, block_size))

    def recall(self) -> chunking.PrefillChunk | None:
        """The chunks of the fit an earlier load measured on this model and machine, or None."""
        fit = _fit_of(measured.recall(self.cache_dir, self.key))
        return None if fit is None else chunking.from_fit(fit, chunking.chunk_sizes(self.block_size), recalled=True)

    def keep(self, chunk: chunking.PrefillChunk) -> chunking.PrefillChunk:
        """Remember a just-measured fit for later loads (a fallback, which measured nothing, is
        not kept: the next load tries again); the chunk."""
        if chunk.fit is not None and not chunk.recalled:
            measured.remember(self.cache_dir, self.key, asdict(chunk.fit))
        return chunk


def _fit_of(kept: dict | None) -> chunking.ChunkFit | None:
    """The fit a kept value holds, or None when it holds no usable one (a damaged file)."""
    if kept is None:
        return None
    try:
        fit = chunking.ChunkFit(kept["tokens"], kept["intercept"], kept["slope"], kept["points"])
    except (KeyError, TypeError):
        return None
    whole = all(type(v) is int for v in (fit.tokens, fit.points))
    numbers = all(type(v) in (int, float) and math.isfinite(v) for v in (fit.intercept, fit.slope))
    return fit if whole and numbers and fit.tokens > 0 and fit.intercept > 0 and fit.slope >= 0 else None


def choose(model: Any, model_path: Path, cache_dir: Path, block_size: int,
           given: int | chunking.PrefillChunk | None,
           timing: Callable[[], None] = lambda: None) -> chunking.PrefillChunk:
    """chunking.choose, but a fit is first recalled, and a newly measured one kept; `timing` is
    called only when the model is timed now."""
    if given is not None:
        return chunking.choose(model, block_size, given)
    memory = FitMemory.of(model_path, cache_dir, block_size)
    recalled = memory.recall()
    if recalled is not None:
        log.info("prefill chunks of %d tokens at depth 0, %d at depth %d (~%.2f s each; measured at an earlier "
                 "load, recalled from %s)", recalled.tokens, recalled.tokens_at_reference,
                 chunking.REFERENCE_DEPTH, recalled.seconds_at_reference, cache_dir)
        return recalled
    timing()
    return memory.keep(chunking.choose(model, block_size, None))
