"""Engine's `progress`: a load tells each phase as it starts (for the daemon's model list
and status page while a model loads), in order, each where its work is. Real model."""

from __future__ import annotations

import mlx.core as mx

from kvtier.config import CacheConfig
from kvtier.engine import PHASES, Engine

BLOCK = 16


def test_a_load_tells_its_phases_in_order_as_each_starts(llama_model, tmp_path):
    told: list[tuple[str, int, bool]] = []
    cache_dir = tmp_path / "cache"

    def progress(phase: str) -> None:
        told.append((phase, mx.get_active_memory(), (cache_dir / "index").exists()))

    engine = Engine(str(llama_model), CacheConfig(cache_dir=cache_dir, block_size=BLOCK), None, progress=progress)
    try:
        assert [phase for phase, _, _ in told] == list(PHASES) == [
            "reading weights", "probing the cache", "timing prefill", "opening the cache"]
        memory = {phase: active for phase, active, _ in told}
        # The weights are read between the first phase and the second one.
        assert memory["probing the cache"] - memory["reading weights"] >= engine.weight_bytes
        assert engine.prefill_chunk.chosen == "measured"  # timed, as told
        assert [opened for _, _, opened in told] == [False, False, False, False]  # the cache opens last
        assert cache_dir.joinpath("index").exists()
    finally:
        engine.close()


def test_a_fixed_prefill_step_is_not_timed_nor_told(llama_model, tmp_path):
    told: list[str] = []
    engine = Engine(str(llama_model), CacheConfig(cache_dir=tmp_path / "cache", block_size=BLOCK), 256,
                    progress=told.append)
    engine.close()
    assert told == ["reading weights", "probing the cache", "opening the cache"]
    assert engine.prefill_step_size == 256
