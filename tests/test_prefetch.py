"""The start-up prefetch: after a restart the daemon reads its model's most recently used
entries from disk into RAM in the background, so the next turn is served from RAM, exact
against plain mlx-lm, hybrid snapshots included. It stays inside its budget and the hot
tier's room, drops a damaged file as a restore would, and keeps nothing a purge removed."""

from __future__ import annotations

import time

import pytest

from kvtier.config import CacheConfig
from kvtier.engine import Engine
from kvtier.requests import GenerationRequest
from kvtier.scheduler import generate
from tests.conftest import MODELS, TEST_BLOCK_SIZE, Reference, agent_messages
from tests.support.testmodels import make_model

MAX_TOKENS = 12


def _prefetched(daemon, timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        prefetch = daemon.get("/cache/stats")["prefetch"]
        if prefetch and prefetch["done"]:
            return prefetch
        time.sleep(0.1)
    raise TimeoutError("the prefetch did not end")


@pytest.mark.parametrize("arch", ["llama", "qwen3_next"])
def test_after_a_restart_the_next_turn_is_served_from_ram(daemon_factory, arch):
    model = make_model(MODELS / arch, arch)
    reference = Reference(model)
    daemon = daemon_factory(model, "--prefetch", "256MB")
    client = daemon.client()

    def ask(messages: list[dict]):
        reply = client.chat.completions.create(model=str(model), messages=messages, max_tokens=MAX_TOKENS,
                                               temperature=0)
        return reply.choices[0].message.content, reply.usage.model_extra["kvtier"]

    first = agent_messages("prefetch", question="List the files.")
    text, _ = ask(first)
    assert text == reference.chat(first, MAX_TOKENS)
    daemon.restart()
    prefetch = _prefetched(daemon)
    assert prefetch["entries"] > 0 and prefetch["bytes"] > 0 and prefetch["stopped"] is None
    second = agent_messages("prefetch", question="Run the tests.")
    text, usage = ask(second)
    assert text == reference.chat(second, MAX_TOKENS)
    assert usage["ram_tokens"] > 0 and usage["disk_tokens"] == 0
    assert usage["prefetched_tokens"] == usage["ram_tokens"]  # RAM held them since the prefetch read them
    text, usage = ask(second)  # the same again: its own blocks now, not only the prefetch's
    assert usage["prefetched_tokens"] < usage["ram_tokens"]
    # The last conversation's text was tokenized ahead: the new prompt tokenized only its new text.
    assert prefetch["tokenized_texts"] >= 1
    tokenizer = daemon.get("/cache/stats")["tokenizer"]
    assert tokenizer["incremental"] and tokenizer["tokens_reused"] > usage["ram_tokens"] // 2
    if arch == "llama":  # the last conversation was made live: taken over as a warm turn is
        assert prefetch["live_tokens"] > 0 and usage["live_tokens"] > 0
    else:  # a live cache with snapshot layers serves only a prompt extending its whole sequence
        assert prefetch["live_tokens"] == 0 and usage["live_tokens"] == 0


def _cached_engine(model, cache_dir, ram_budget: int | None = None) -> tuple[Engine, list[int]]:
    """An engine on a cache holding one conversation (written by an engine before it)."""
    config = dict(cache_dir=cache_dir, block_size=TEST_BLOCK_SIZE)
    writer = Engine(str(model), CacheConfig(**config))
    tokens = writer.renderer.chat_tokens(agent_messages("prefetch", question="List the files."))
    list(generate(writer, GenerationRequest(tokens, MAX_TOKENS, temperature=0.0)))
    writer.close()
    if ram_budget is not None:
        config["ram_budget"] = ram_budget
    return Engine(str(model), CacheConfig(**config)), tokens


def _live_sequences(engine: Engine) -> list[list[int]]:
    assert engine.store.live is not None  # a model whose KV kvtier stores
    return engine.store.live.sequences()


def _run_prefetch(engine: Engine, budget: int) -> dict:
    engine.store.plan_prefetch(budget)
    while engine.store.prefetch_step(entries=2):
        pass
    return engine.store.stats()["prefetch"]


def test_the_newest_conversation_is_made_live_and_its_next_turn_stays_exact(llama_model, reference, tmp_path):
    """After the blocks, the last conversation is rebuilt into a live cache; a turn that
    extends it (the agent's next request) takes it over whole, as a warm turn does."""
    engine, tokens = _cached_engine(llama_model, tmp_path / "cache")
    try:
        engine.store.plan_prefetch(2**30)
        while engine.prefetch_step():
            pass
        live = engine.store.stats()["prefetch"]["live_tokens"]
        assert live > len(tokens) and _live_sequences(engine)[0] == \
            tokens + _live_sequences(engine)[0][len(tokens):]  # the prompt, then the answer
        answer = reference.generate(tokens, MAX_TOKENS)
        follow = reference.chat_tokens(agent_messages("prefetch", question="List the files.") + [
            {"role": "assistant", "content": answer}, {"role": "user", "content": "Continue."}])
        chunks = list(generate(engine, GenerationRequest(follow, MAX_TOKENS, temperature=0.0)))
        assert "".join(c.text for c in chunks) == reference.generate(follow, MAX_TOKENS)
        usage = chunks[-1].usage
        assert usage is not None and usage.live_tokens > len(tokens) // 2
    finally:
        engine.close()


def test_the_prefetch_stays_inside_its_budget_and_the_hot_tier(llama_model, tmp_path):
    engine, _ = _cached_engine(llama_model, tmp_path / "cache")
    try:
        entries = engine.store.stats()["disk"]["entries"]
        one = next(record.nbytes for _, record in engine.store.index.newest())
        stats = _run_prefetch(engine, budget=3 * one)
        assert 0 < stats["entries"] <= 3 < entries and engine.store.hot_bytes() <= 3 * one
    finally:
        engine.close()
    engine, _ = _cached_engine(llama_model, tmp_path / "cache", ram_budget=2 * one)
    try:
        assert 0 < _run_prefetch(engine, budget=2**30)["entries"] <= 2
        assert engine.store.hot_bytes() <= 2 * one
    finally:
        engine.close()


def test_a_damaged_file_is_dropped_and_the_answer_stays_exact(llama_model, reference, tmp_path):
    engine, tokens = _cached_engine(llama_model, tmp_path / "cache")
    try:
        key, record = next(engine.store.index.newest())
        path = engine.store.files.path_for(key.hex())
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        stats = _run_prefetch(engine, budget=2**30)
        assert stats["entries"] > 0 and not engine.store.is_hot(key)
        assert engine.store.stats()["counters"]["damaged_blocks"] == 1 and not path.exists()
        chunks = list(generate(engine, GenerationRequest(tokens, MAX_TOKENS, temperature=0.0)))
        assert "".join(c.text for c in chunks) == reference.generate(tokens, MAX_TOKENS)
    finally:
        engine.close()


@pytest.mark.parametrize("interruption, why", [
    (lambda store: store.forget_hot(), "purged"),  # a purge while the prefetch runs
    (lambda store: store.spill(0), "memory pressure"),
], ids=["purge", "memory pressure"])
def test_a_purge_or_memory_pressure_ends_the_prefetch_and_nothing_read_is_kept(llama_model, tmp_path,
                                                                               interruption, why):
    engine, _ = _cached_engine(llama_model, tmp_path / "cache")
    try:
        engine.store.plan_prefetch(2**30)
        assert engine.store.prefetch_step(entries=1)  # one slice read, more planned
        interruption(engine.store)
        assert not engine.store.prefetch_step(entries=1)
        stats = engine.store.stats()
        assert stats["prefetch"]["stopped"] == why and stats["ram"]["entries"] == 0
    finally:
        engine.close()


def _revived_after(model, cache_dir, conversations: list[list[dict]]) -> Engine:
    """An engine restarted on a cache an engine before it wrote `conversations` to, past its
    whole prefetch (blocks read, live caches rebuilt)."""
    config = dict(cache_dir=cache_dir, block_size=TEST_BLOCK_SIZE)
    writer = Engine(str(model), CacheConfig(**config))
    for messages in conversations:
        list(generate(writer, GenerationRequest(writer.renderer.chat_tokens(messages), MAX_TOKENS, temperature=0.0)))
    writer.close()
    engine = Engine(str(model), CacheConfig(**config))
    engine.store.plan_prefetch(2**30)
    while engine.prefetch_step():
        pass
    return engine


def test_the_last_conversations_come_back_live_newest_last(llama_model, reference, tmp_path):
    conversations = [agent_messages(project, question="List the files.") for project in ("alpha", "beta")]
    prompts = [reference.chat_tokens(messages) for messages in conversations]
    engine = _revived_after(llama_model, tmp_path / "cache", conversations)
    try:
        sequences = _live_sequences(engine)  # oldest first
        assert len(sequences) == 2
        for tokens, sequence in zip(prompts, sequences):
            assert sequence[:len(tokens)] == tokens and len(sequence) > len(tokens)  # prompt and answer
    finally:
        engine.close()


def test_other_prefixes_come_back_live_before_more_turns_of_one(llama_model, reference, tmp_path):
    """Five conversations, the four newest on one system prompt: the revival takes the
    oldest one too (another agent's prefix), so its next turn after the restart is taken
    over live instead of copied from the hot blocks, exact."""
    from kvtier.live import SLOTS

    other = agent_messages("subagent", question="List the files.")
    conversations = [other] + [agent_messages("main", question=f"Step {i}.") for i in range(SLOTS)]
    engine = _revived_after(llama_model, tmp_path / "cache", conversations)
    try:
        other_tokens = reference.chat_tokens(other)
        assert any(s[:len(other_tokens)] == other_tokens for s in _live_sequences(engine))
        follow = other + [{"role": "assistant", "content": reference.chat(other, MAX_TOKENS)},
                          {"role": "user", "content": "Continue."}]
        chunks = list(generate(engine, GenerationRequest(reference.chat_tokens(follow), MAX_TOKENS, temperature=0.0)))
        assert "".join(c.text for c in chunks) == reference.chat(follow, MAX_TOKENS)
        usage = chunks[-1].usage
        assert usage is not None and usage.live_tokens > len(other_tokens) // 2
    finally:
        engine.close()
