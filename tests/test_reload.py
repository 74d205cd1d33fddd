"""A model loaded again after an unload (kvtier/engine.py, `earlier`): while its files are the
ones the earlier load read, the reload takes over that load's tokenizer, prompt renderer (its
recent texts: the next turn tokenizes only what is new) and cache plan instead of making them
again, and writes nothing to the index that is already there; its answers stay plain mlx-lm's.
Changed files are a model of their own: nothing is taken over."""

from __future__ import annotations

import json
import shutil

from kvtier.config import CacheConfig
from kvtier.engine import Engine
from kvtier.requests import GenerationRequest
from kvtier.scheduler import generate
from tests.conftest import TEST_BLOCK_SIZE, Reference, agent_messages


def answer(engine: Engine, messages: list[dict]) -> str:
    tokens, boundaries = engine.renderer.render(messages, None)
    request = GenerationRequest(tokens, max_tokens=8, temperature=0.0, boundaries=boundaries)
    return "".join(chunk.text for chunk in generate(engine, request))


def test_a_reload_takes_over_the_earlier_loads_tokenizer_renderer_and_plan(llama_model, tmp_path):
    config = CacheConfig(cache_dir=tmp_path / "cache", block_size=TEST_BLOCK_SIZE)
    messages = agent_messages("reloaded", repeat=1)
    first = Engine(str(llama_model), config, prefill_step_size=64)
    answer(first, messages)
    first.close()
    again = Engine(str(llama_model), config, prefill_step_size=64, earlier=first)
    try:
        assert again.tokenizer is first.tokenizer and again.renderer is first.renderer
        assert (again.plan, again.layout, again.fingerprint) == (first.plan, first.layout, first.fingerprint)
        messages += [{"role": "assistant", "content": "Done."}, {"role": "user", "content": "And now?"}]
        assert answer(again, messages) == Reference(llama_model).chat(messages, 8)
    finally:
        again.close()


def test_a_reload_of_changed_files_takes_nothing_over(llama_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(llama_model, model)
    config = CacheConfig(cache_dir=tmp_path / "cache", block_size=TEST_BLOCK_SIZE)
    first = Engine(str(model), config, prefill_step_size=64)
    first.close()
    settings = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps(dict(settings, model_max_length=1234)))
    again = Engine(str(model), config, prefill_step_size=64, earlier=first)
    try:
        assert again.fingerprint != first.fingerprint
        assert again.tokenizer is not first.tokenizer and again.renderer is not first.renderer
    finally:
        again.close()


def test_registering_a_model_again_writes_nothing_new(tmp_path):
    from kvtier.index import Index

    index = Index(tmp_path / "index")
    try:
        index.register_model("f" * 32, {"name": "a"})
        pages = index.env.info()["last_txnid"]
        index.register_model("f" * 32, {"name": "a"})
        assert index.env.info()["last_txnid"] == pages  # no commit
        index.register_model("f" * 32, {"name": "b"})
        assert index.env.info()["last_txnid"] == pages + 1
        assert index.models()["f" * 32]["name"] == "b"
    finally:
        index.close()
