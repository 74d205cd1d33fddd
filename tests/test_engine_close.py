"""Engine.close, as a pool unloading a model calls it: every block the model computed is on
disk first (a reload restores the whole conversation from there), then the model's memory
is released even while the Engine object stays referenced. Real models, LMDB and files."""

from __future__ import annotations

import gc

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from kvtier.config import CacheConfig
from kvtier.engine import Engine, ModelReleased
from kvtier.requests import GenerationRequest, Usage
from kvtier.scheduler import generate
from tests.conftest import MODELS, Reference
from tests.support.testmodels import make_model

BLOCK = 16
MAX_TOKENS = 8


@pytest.fixture(scope="module", params=["llama", "qwen3_next"])
def arch_model(request):
    return make_model(MODELS / request.param, request.param)


def answer(engine: Engine, tokens: list[int]) -> tuple[str, Usage]:
    chunks = list(generate(engine, GenerationRequest(tokens, MAX_TOKENS, temperature=0.0)))
    usage = chunks[-1].usage
    assert usage is not None  # the last chunk carries it
    return "".join(c.text for c in chunks), usage


def test_a_reload_restores_the_whole_conversation_from_disk(arch_model, tmp_path):
    reference = Reference(arch_model)
    config = CacheConfig(cache_dir=tmp_path / "cache", block_size=BLOCK)
    tokens = reference.chat_tokens([{"role": "user", "content": "Keep all of this on disk. " * 5}])
    generated = [token for token, _ in reference.logprobs(tokens, MAX_TOKENS)]
    first = Engine(str(arch_model), config)
    try:
        text, _ = answer(first, tokens)
    finally:
        first.close()
    assert text == reference.generate(tokens, MAX_TOKENS)

    # The next turn: the prompt, the answer, more. Every token the first engine's cache held
    # (the prompt and the answer but its last token, never fed back) comes from disk.
    turn = tokens + generated + reference.tokenizer.encode(" Go on, please.")
    again = Engine(str(arch_model), config)
    try:
        text, usage = answer(again, turn)
    finally:
        again.close()
    assert usage.disk_tokens == len(tokens) + len(generated) - 1 and usage.ram_tokens == 0
    assert text == reference.generate(turn, MAX_TOKENS)


def test_close_releases_the_model_while_the_engine_is_referenced(llama_model, reference, tmp_path):
    engine = Engine(str(llama_model), CacheConfig(cache_dir=tmp_path / "cache", block_size=BLOCK))
    weights = sum(v.nbytes for _, v in tree_flatten(engine.model.parameters()))
    answer(engine, reference.chat_tokens([{"role": "user", "content": "Hello there."}]))
    gc.collect()
    before = mx.get_active_memory()
    gc.disable()  # released by close itself, not by a garbage collection (0.05-0.4 s of each unload)
    try:
        engine.close()
        assert before - mx.get_active_memory() >= weights  # `engine` is still referenced here
    finally:
        gc.enable()
    with pytest.raises(ModelReleased, match="closed"):
        answer(engine, [1, 2, 3])
    engine.close()  # a second close does nothing
