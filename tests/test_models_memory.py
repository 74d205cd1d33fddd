"""A model's memory, as a daemon holding several under one budget counts it: its weights
before loading (kvtier.models_memory.weights_on_disk) and once loaded (Engine.weight_bytes),
its hot KV (TieredStore.hot_bytes). Real files, a real generated model."""

from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_flatten

from kvtier.config import CacheConfig
from kvtier.engine import Engine
from kvtier.models_memory import weights_on_disk
from kvtier.requests import GenerationRequest
from kvtier.scheduler import generate

BLOCK = 16


def test_weights_on_disk_counts_the_safetensors_files_links_followed(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model-00001-of-00002.safetensors").write_bytes(b"w" * 1000)
    blob = tmp_path / "blobs" / "0123abcd"  # a Hugging Face snapshot links to its blobs
    blob.parent.mkdir()
    blob.write_bytes(b"w" * 234)
    (model / "model-00002-of-00002.safetensors").symlink_to(blob)
    (model / "config.json").write_text("{}" * 50)  # not weights
    (model / "tokenizer.json").write_text("{}" * 50)
    assert weights_on_disk(model) == 1234
    assert weights_on_disk(tmp_path / "blobs") == 0  # no weights there


def test_a_loaded_models_weight_bytes_are_its_parameters_about_its_files(llama_model, tmp_path):
    before = mx.get_active_memory()
    engine = Engine(str(llama_model), CacheConfig(cache_dir=tmp_path / "cache", block_size=BLOCK))
    try:
        loaded = mx.get_active_memory() - before
        assert engine.weight_bytes == sum(v.nbytes for _, v in tree_flatten(engine.model.parameters()))
        on_disk = weights_on_disk(llama_model)
        # The files hold the same arrays plus a header each (the tensors' names, shapes, offsets).
        assert 0 < on_disk - engine.weight_bytes < 64 * 1024
        assert loaded >= engine.weight_bytes  # what loading took is at least the weights
    finally:
        engine.close()


def test_hot_bytes_are_the_ram_tier_and_the_live_caches(llama_model, reference, tmp_path):
    engine = Engine(str(llama_model), CacheConfig(cache_dir=tmp_path / "cache", block_size=BLOCK))
    try:
        assert engine.store.hot_bytes() == 0
        tokens = reference.chat_tokens([{"role": "user", "content": "How much of this stays hot? " * 4}])
        list(generate(engine, GenerationRequest(tokens, 4, temperature=0.0)))
        stats = engine.store.stats()
        assert stats["ram"]["bytes"] > 0 and stats["live"]["bytes"] > 0
        assert engine.store.hot_bytes() == stats["ram"]["bytes"] + stats["live"]["bytes"]
    finally:
        engine.close()
    assert engine.store.hot_bytes() == 0  # written to disk, and let go of with the model
