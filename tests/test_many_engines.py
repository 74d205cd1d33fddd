"""Several models in one process on one cache directory (issue 31): their stores share the
directory's LocalDisk (LMDB allows one environment per file in a process), each model's
blocks are recorded as its own, and one model closing leaves the other serving. Real
generated models, real LMDB and files; every answer is plain mlx-lm's."""

from __future__ import annotations

import pytest

from kvtier import disk_registry
from kvtier.config import CacheConfig
from kvtier.disk import DamagedBlock
from kvtier.engine import Engine
from kvtier.requests import GenerationRequest, Usage
from kvtier.scheduler import generate
from tests.conftest import MODELS, Reference
from tests.support.testmodels import make_model

BLOCK = 16
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def hybrid_model():
    return make_model(MODELS / "qwen3_next", "qwen3_next")


def answer(engine: Engine, tokens: list[int]) -> tuple[str, Usage]:
    chunks = list(generate(engine, GenerationRequest(tokens, MAX_TOKENS, temperature=0.0)))
    usage = chunks[-1].usage
    assert usage is not None  # the last chunk carries it
    return "".join(c.text for c in chunks), usage


def prompt(reference: Reference, text: str) -> list[int]:
    return reference.chat_tokens([{"role": "user", "content": text * 4}])


def records_by_model(engine: Engine) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, record in engine.store.index.items():
        if record is not None:
            counts[record.fingerprint] = counts.get(record.fingerprint, 0) + 1
    return counts


def test_two_models_share_a_cache_dir_and_one_reopens_from_disk(llama_model, reference, hybrid_model, tmp_path):
    config = CacheConfig(cache_dir=tmp_path / "cache", block_size=BLOCK)
    hybrid = Reference(hybrid_model)
    tokens_a = prompt(reference, "Which model answers this one? ")
    tokens_b = prompt(hybrid, "And which answers this other one? ")
    a = Engine(str(llama_model), config)
    b = Engine(str(hybrid_model), config)
    try:
        assert a.store.disk is b.store.disk and disk_registry.users(config.cache_dir) == 2
        assert answer(a, tokens_a)[0] == reference.generate(tokens_a, MAX_TOKENS)
        text_b = answer(b, tokens_b)[0]
        assert text_b == hybrid.generate(tokens_b, MAX_TOKENS)
        a.close()  # every block of A on disk; B keeps the disk open
        assert disk_registry.users(config.cache_dir) == 1
        b.store.flush()
        held = records_by_model(b)  # each record names the model whose block it is
        assert held[a.fingerprint] > 0 and held[b.fingerprint] > 0 and len(held) == 2

        turn_b = tokens_b + hybrid.tokenizer.encode(text_b + " Go on.")
        text, usage = answer(b, turn_b)
        assert text == hybrid.generate(turn_b, MAX_TOKENS) and usage.cached_tokens > 0

        a = Engine(str(llama_model), config)
        assert a.store.disk is b.store.disk
        text, usage = answer(a, tokens_a)
        assert usage.disk_tokens > 0 and text == reference.generate(tokens_a, MAX_TOKENS)
        # The request counters stay each model's own, in the stores and in the index.
        a.store.flush()
        counted = {fp: (c.get("requests_miss", 0), c.get("requests_hit", 0))
                   for fp, c in a.store.index.counters().items()}
        assert counted == {a.fingerprint: (1, 1), b.fingerprint: (1, 1)}
        assert (a.store.counters["requests_miss"], a.store.counters["requests_hit"]) == (0, 1)
        assert (b.store.counters["requests_miss"], b.store.counters["requests_hit"]) == (1, 1)
    finally:
        a.close()
        b.close()
    assert disk_registry.users(config.cache_dir) == 0


def test_a_disk_event_reaches_the_stores_left_once_the_opener_closes(llama_model, tmp_path, caplog):
    """The store that opened the disk closes first: what the disk counts after (a damaged
    file, a write error) is not lost, the store still using it counts it. The disk has one
    budget: the first store's."""
    config = CacheConfig(cache_dir=tmp_path / "cache", block_size=BLOCK, disk_budget=1 << 30)
    opener = Engine(str(llama_model), config)
    other = Engine(str(llama_model), CacheConfig(cache_dir=tmp_path / "cache", block_size=BLOCK * 2,
                                                 disk_budget=1 << 29))
    disk = other.store.disk
    assert disk is opener.store.disk and disk.budget == 1 << 30
    assert "open already with a disk budget of 1.0 GiB: kept (not 512.0 MiB)" in caplog.text
    opener.close()
    disk.drop_damaged(b"\0" * 32, DamagedBlock("test"))
    assert other.store.counters["damaged_blocks"] == 1 and opener.store.counters["damaged_blocks"] == 0
    other.close()
    assert disk_registry.users(config.cache_dir) == 0
