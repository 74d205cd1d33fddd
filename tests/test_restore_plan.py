"""One request's two calls on the store, with a real model, LMDB and files: `restore` gives one
plan (blocks, per-tier counts, bytes) and `keep` makes the blocks read from disk hot."""

from __future__ import annotations

from kvtier import kvstate
from kvtier.config import CacheConfig
from kvtier.engine import Engine
from kvtier.requests import GenerationRequest
from kvtier.scheduler import generate

BLOCK = 16


def test_restore_plans_the_prefix_and_keep_makes_the_disk_blocks_hot(llama_model, tmp_path):
    config = CacheConfig(cache_dir=tmp_path / "cache", block_size=BLOCK)
    engine = Engine(str(llama_model), config)
    tokens = engine.renderer.chat_tokens([{"role": "user", "content": "Explain the block keys. " * 4}])
    try:
        list(generate(engine, GenerationRequest(tokens, 4, temperature=0.0)))
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
        assert engine.plan is not None  # the test model's KV can be stored
        prompt_cache = kvstate.rebuild(engine.model, engine.plan, buffers, restored.reuse, None)
        store.keep(restored, prompt_cache, sequence=None, snapshots={})  # nothing computed
        assert all(store.is_hot(h.ref.key) for h in restored.match.hits[: full // BLOCK])

        again = store.restore(tokens, into=kvstate.PromptBuffers(engine.layout, capacity=len(tokens) + 1))
        # The full blocks are hot now; the partly used tail block still comes from disk.
        assert (again.ram_tokens, again.disk_tokens) == (full, len(tokens) - 1 - full)
    finally:
        engine.close()


def _answer(engine: Engine, tokens: list[int]) -> list[int]:
    """Run one request; the tokens its cache held at the end (prompt and answer), as stored
    (and kept live: the newest live cache holds exactly them)."""
    list(generate(engine, GenerationRequest(tokens, 4, temperature=0.0)))
    assert engine.store.live is not None
    return engine.store.live.sequences()[-1]


def test_a_partial_tail_used_whole_is_replaced_by_the_full_block(llama_model, tmp_path):
    """A request whose prompt takes a stored partial tail block whole (the conversation went
    on) stores the full block in its place. Were that block counted as already held, it
    would never be stored: the chain would end at the old tail, and every later turn
    (after a restart: no live cache) would recompute from there."""
    config = CacheConfig(cache_dir=tmp_path / "cache", block_size=BLOCK)
    engine = Engine(str(llama_model), config)
    more = engine.renderer.text_tokens(" and then the next step of the plan, written out in full")
    try:
        first = engine.renderer.chat_tokens([{"role": "user", "content": "Explain the block keys. " * 3}])
        held = _answer(engine, first)
        assert len(held) % BLOCK  # the first request ends in a partial tail block
        second = held + more
        held_second = _answer(engine, second)
    finally:
        engine.close()
    engine = Engine(str(llama_model), config)
    try:
        third = held_second + more
        restored = engine.store.restore(third, into=kvstate.PromptBuffers(engine.layout, len(third) + 1))
        assert restored.reuse == len(held_second)  # not len(held): the second request's blocks are found
    finally:
        engine.close()
