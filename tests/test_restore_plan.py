"""One request's two calls on the store, with a real model, LMDB and files: `restore` gives one
plan (blocks, per-tier counts, bytes) and `keep` makes the blocks read from disk hot."""

from __future__ import annotations

from kvtier import kvstate
from kvtier.config import CacheConfig
from kvtier.engine import Engine, GenerationRequest

BLOCK = 16


def test_restore_plans_the_prefix_and_keep_makes_the_disk_blocks_hot(llama_model, tmp_path):
    config = CacheConfig(cache_dir=tmp_path / "cache", block_size=BLOCK)
    engine = Engine(str(llama_model), config)
    tokens = engine.renderer.chat_tokens([{"role": "user", "content": "Explain the block keys. " * 4}])
    try:
        list(engine.generate(GenerationRequest(tokens, 4, temperature=0.0)))
    finally:
        engine.close()  # every block on disk, none hot in the next process

    engine = Engine(str(llama_model), config)
    try:
        store = engine.store
        buffers = kvstate.PromptBuffers(engine.layout, capacity=len(tokens) + 1)
        restored = store.restore(tokens, into=buffers)
        assert restored.reuse == len(tokens) - 1  # all but the last token, which is computed
        assert (restored.ram_tokens, restored.disk_tokens, restored.shared_tokens) == (0, len(tokens) - 1, 0)
        assert restored.restored_bytes == sum(h.nbytes for h in restored.match.hits) > 0
        assert store.counters["tokens_from_disk"] == len(tokens) - 1 and store.counters["requests_hit"] == 1

        full = restored.reuse // BLOCK * BLOCK  # the blocks wholly restored
        prompt_cache = kvstate.rebuild(engine.model, engine.plan, buffers, restored.reuse, None)
        store.keep(restored, prompt_cache, sequence=None, snapshots={})  # nothing computed
        assert all(store.is_hot(h.ref.key) for h in restored.match.hits[: full // BLOCK])

        again = store.restore(tokens, into=kvstate.PromptBuffers(engine.layout, capacity=len(tokens) + 1))
        # The full blocks are hot now; the partly used tail block still comes from disk.
        assert (again.ram_tokens, again.disk_tokens) == (full, len(tokens) - 1 - full)
    finally:
        engine.close()
