"""At start-up, before the first load (one model in memory at a time, as the memory budget
says): the prefill chunk fit of each configured model that will load on demand and has none
kept on this machine yet is measured and kept (kvtier/chunk_memory.py), so its first request
does not wait for the probe. Models reached only through --allow-any-model measure at their
first load; with --prefill-step-size N nothing is measured."""

from __future__ import annotations

import logging
import time

import mlx.core as mx
from mlx_lm.utils import load_model

from kvtier import chunk_memory, chunking
from kvtier.config import ModelSpec, ServeConfig
from kvtier.engine import release_weights, resolve_model_path
from kvtier.models_memory import weights_on_disk

log = logging.getLogger("kvtier.daemon")


def measure_unremembered(config: ServeConfig) -> None:
    """On the MLX thread, before the default model loads. A model that fails to load or to
    measure here is logged and skipped: its own load reports it, the daemon still starts."""
    if config.prefill_step_size is not None:
        return
    for spec in on_demand(config.models):
        try:
            _measure_if_new(spec, config)
        except Exception as exc:
            log.warning("could not measure the prefill speed of %s at start-up (%s): its first load measures it",
                        spec.name, " ".join(str(exc).split()))


def on_demand(specs: list[ModelSpec]) -> list[ModelSpec]:
    """The configured models that load on demand: not the default, not the pinned ones (both
    load at start-up and measure then)."""
    return [spec for spec in specs[1:] if not spec.pin]


def _measure_if_new(spec: ModelSpec, config: ServeConfig) -> None:
    block_size = config.cache.block_size
    path = resolve_model_path(spec.source)
    memory = chunk_memory.FitMemory.of(path, config.cache.cache_dir, block_size)
    if memory.recall() is not None:
        return
    if config.memory_budget and weights_on_disk(path) > config.memory_budget:
        return  # it can never load under the budget: its request fails then
    log.info("measuring the prefill speed of %s (first start on this machine)", spec.name)
    started = time.perf_counter()
    model = load_model(path)[0]
    try:
        chunk = memory.keep(chunking.choose(model, block_size, None))
    finally:
        release_weights(model)
        mx.clear_cache()
    if chunk.fit is not None:
        log.info("%s: prefill speed measured and kept in %.1f s", spec.name, time.perf_counter() - started)
