"""Continuous batching: requests restored from the tiers, prefilled in chunks between decode
steps and decoded in one mlx-lm batch give plain mlx-lm's greedy text, for every
architecture; a cancelled stream leaves the batch and the others finish right."""

from __future__ import annotations

import threading
import urllib.request

import pytest

from conftest import MODELS, Reference, agent_messages
from tests.support.testmodels import ARCHES, make_model

MAX_TOKENS = 10
QUESTIONS = ("List the files.", "Run the tests now and say which fail.", "Why?")


@pytest.fixture(scope="module", params=ARCHES)
def arch_model(request):
    return make_model(MODELS / request.param, request.param)


def _conversation(question: str) -> list[dict]:
    return agent_messages("batch", question=question, repeat=2)  # longer than a sliding window


def test_batched_texts_equal_mlx_lm_for_every_architecture(arch_model, tmp_path):
    from kvtier.batch import Batch
    from kvtier.config import CacheConfig
    from kvtier.engine import Engine, GenerationRequest

    reference = Reference(arch_model)
    engine = Engine(str(arch_model), CacheConfig(cache_dir=tmp_path, block_size=64), prefill_step_size=64)
    done = object()
    try:
        batch = Batch(engine, max_size=4, done=done)
        first = [_conversation(q) for q in QUESTIONS]
        # Round two: a follow-up turn restored from the tiers, joined while others decode.
        follow_up = first[0] + [{"role": "assistant", "content": reference.chat(first[0], MAX_TOKENS)},
                                {"role": "user", "content": "Continue."}]
        rounds = [(first, [0, 0, 3]), ([follow_up, first[1]], [0, 2])]
        for conversations, join_at in rounds:
            outputs = [[] for _ in conversations]
            step = 0
            while step <= max(join_at) or not batch.idle:
                for i in (i for i, at in enumerate(join_at) if at == step):
                    tokens = engine.renderer.chat_tokens(conversations[i])
                    batch.add(GenerationRequest(tokens, MAX_TOKENS, temperature=0.0,
                                                boundaries=engine.renderer.message_boundaries(conversations[i], None, tokens)),
                              outputs[i].append)
                batch.step()
                step += 1
            texts = []
            for conversation, items in zip(conversations, outputs):
                assert items[-1] is done and items[-2].finish_reason in ("length", "stop")
                texts.append("".join(item.text for item in items[:-1]))
                assert texts[-1] == reference.chat(conversation, MAX_TOKENS)
            assert len(set(texts)) == len(texts)  # the prompts lead to different texts
        usage = outputs[0][-2].usage  # the follow-up: its earlier turn came from the tiers
        assert usage.cached_tokens > 0
        assert batch.stats.decode_tokens > batch.stats.decode_steps  # several rows per step
    finally:
        engine.close()


def _stream(daemon, messages: list[dict], out: dict, key: str, cancel_after: int | None = None) -> None:
    stream = daemon.client().chat.completions.create(
        model=str(daemon.model), messages=messages, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True})
    text, pieces = "", 0
    for event in stream:
        if event.choices and event.choices[0].delta.content:
            text += event.choices[0].delta.content
            pieces += 1
            if cancel_after is not None and pieces >= cancel_after:
                stream.close()  # the client goes away mid-answer
                break
        if event.usage:
            out[key + "_usage"] = event.usage.model_dump()
    out[key] = text


def test_concurrent_streams_batch_and_a_cancelled_one_leaves(daemon_factory, llama_model, reference):
    daemon = daemon_factory(llama_model, "--max-batch", "3", "--batch-inexact")
    health = daemon.get("/health")["batching"]
    assert health["enabled"] and health["max_batch"] == 3
    conversations = {"a": _conversation(QUESTIONS[0]), "b": _conversation(QUESTIONS[1]),
                     "c": _conversation(QUESTIONS[2])}
    out: dict = {}
    threads = [threading.Thread(target=_stream, args=(daemon, m, out, k, 2 if k == "c" else None))
               for k, m in conversations.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    for key in ("a", "b"):
        assert out[key] == reference.chat(conversations[key], 24), key
    assert out["a"] != out["b"]
    stats = daemon.get("/cache/stats")
    assert stats["batch"]["running"] == 0  # the cancelled stream left the batch too
    assert stats["counters"].get("requests_cancelled", 0) >= 1
    assert stats["batch"]["decode_tokens"] > 0 and stats["batch"]["queue_wait_seconds_total"] >= 0
    # A later turn reuses what the batched requests stored.
    again = daemon.client().chat.completions.create(model=str(daemon.model), messages=conversations["b"],
                                                    max_tokens=24, temperature=0)
    assert again.choices[0].message.content == out["b"]
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    with urllib.request.urlopen(daemon.url + "/metrics", timeout=30) as response:
        metrics = response.read().decode()
    for name in ("kvtier_batch_size", "kvtier_queue_wait_seconds_total", "kvtier_decode_tokens_per_second",
                 "kvtier_prefill_tokens_per_second"):
        assert name in metrics


def test_seeded_sampling_runs_alone_and_repeats(daemon_factory, llama_model):
    daemon = daemon_factory(llama_model, "--max-batch", "3", "--batch-inexact")
    messages = agent_messages("batch", question="Say something.", repeat=1)
    out: list = [None, None]

    def ask(i: int) -> None:
        out[i] = daemon.client().chat.completions.create(
            model=str(daemon.model), messages=messages, max_tokens=8, temperature=1.0, seed=11
        ).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert out[0] is not None and out[0] == out[1]


def test_health_reports_the_batching_decision(daemon_factory, llama_model):
    batching = daemon_factory(llama_model, "--max-batch", "4").get("/health")["batching"]
    assert batching["reason"] and batching["max_batch"] == 4
    # Batching is on by default only where batched decode measured bit-identical.
    assert batching["enabled"] == (batching["max_logprob_difference"] == 0)


def test_same_uncached_prefix_at_once_is_computed_once(llama_model, reference, tmp_path):
    """Two requests arrive together with one long uncached system prompt: the second waits
    for the blocks the first is computing and restores them instead of computing them."""
    from kvtier.batch import Batch
    from kvtier.config import CacheConfig
    from kvtier.engine import Engine, GenerationRequest

    engine = Engine(str(llama_model), CacheConfig(cache_dir=tmp_path, block_size=64), prefill_step_size=64)
    done = object()
    try:
        batch = Batch(engine, max_size=4, done=done)
        conversations = [_conversation(QUESTIONS[0]), _conversation(QUESTIONS[1])]
        tokens = [engine.renderer.chat_tokens(c) for c in conversations]
        outputs: list[list] = [[], []]
        for t, out in zip(tokens, outputs):
            batch.add(GenerationRequest(t, MAX_TOKENS, temperature=0.0), out.append)
        while not batch.idle:
            batch.step()
        shared = next(i for i, (a, b) in enumerate(zip(*tokens)) if a != b)
        usages = [out[-2].usage for out in outputs]
        assert usages[0].cached_tokens == 0
        assert usages[1].cached_tokens == shared > 0  # the whole shared prefix, computed once
        assert engine.store.stats()["counters"]["tokens_computed"] == \
            len(tokens[0]) + len(tokens[1]) - usages[1].cached_tokens
        texts = ["".join(item.text for item in out[:-1]) for out in outputs]
        for conversation, text in zip(conversations, texts):
            assert text == reference.chat(conversation, MAX_TOKENS)
        assert texts[0] != texts[1]
    finally:
        engine.close()


def test_a_quantized_kv_cache_runs_one_at_a_time(llama_model, tmp_path):
    from kvtier.batch import measure_exactness
    from kvtier.config import CacheConfig
    from kvtier.engine import Engine

    engine = Engine(str(llama_model), CacheConfig(cache_dir=tmp_path, block_size=64, kv_bits=8))
    try:
        verdict = measure_exactness(engine)
        assert not verdict.exact and "QuantizedKVCache" in verdict.reason
    finally:
        engine.close()
