"""The contract of a tier below RAM (kvtier/tier.py), passed by every implementation: the local
disk, the Redis tier (skipped without redis-server) and the tests' own dict tier; and a store
with the dict tier below RAM restoring a prefix from it, answers identical to plain mlx-lm."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from kvtier.blocks import BlockRef, block_refs, root_key
from kvtier.config import CacheConfig
from kvtier.disk import DamagedBlock
from kvtier.disk_tier import DiskTier
from kvtier.engine import Engine
from kvtier.kvstate import PromptBuffers, nbytes
from kvtier.local import LocalDisk
from kvtier.ram import HotBlock
from kvtier.requests import GenerationRequest
from kvtier.restored import Hit, Match
from kvtier.scheduler import generate
from kvtier.shared import SharedTier
from kvtier.shared_io import SharedIO
from kvtier.tier import Tier
from kvtier.tier_setup import model_fits
from kvtier.tiers import TieredStore
from kvtier.write_path import encode_hot
from kvtier.writer import Entry
from tests.conftest import TEST_BLOCK_SIZE, agent_messages
from tests.support.blocks import BLOCK, LAYOUT, arrays_for, assert_buffers_hold_blocks
from tests.support.dict_tier import DictTier
from tests.test_shared import REDIS_SERVER, fresh_redis, redis_server  # noqa: F401 (fixtures)

FINGERPRINT = "fp-contract"
FITS = model_fits(LAYOUT, None)
TOKENS = list(range(300, 300 + 3 * BLOCK))
MAX_TOKENS = 8


@pytest.fixture(params=["disk", "shared", "dict"])
def tier(request, tmp_path):
    readers = ThreadPoolExecutor(max_workers=4)
    counts: Counter[str] = Counter()

    def count(name: str, amount: int = 1) -> None:
        counts[name] += amount

    made: Tier
    if request.param == "disk":
        made = DiskTier(LocalDisk.open(tmp_path / "cache", 1 << 30, count, FINGERPRINT), readers,
                        FINGERPRINT, FITS, BLOCK)
    elif request.param == "shared":
        if not REDIS_SERVER:
            pytest.skip("redis-server is not installed (apt-get install redis-server, or `make system-deps`)")
        server = request.getfixturevalue("fresh_redis")
        made = SharedIO(SharedTier(server.url, FINGERPRINT, count), readers, FINGERPRINT, FITS, count)
    else:
        made = DictTier(FINGERPRINT, FITS)
    yield made
    made.close()
    readers.shutdown(wait=True)


def block_tokens(ref: BlockRef) -> np.ndarray:
    return np.asarray(TOKENS[ref.index * BLOCK : (ref.index + 1) * BLOCK], np.uint32)


def put_chain(tier: Tier, skip: tuple[int, ...] = ()) -> list[BlockRef]:
    """The chain of TOKENS' blocks (but those in `skip`) given to `tier`, as the writer gives them."""
    refs = block_refs(TOKENS, BLOCK, FINGERPRINT)
    entries = []
    for ref in refs:
        if ref.index not in skip:
            arrays = arrays_for(ref.index)
            block = HotBlock(ref.key, ref.parent, ref.index, block_tokens(ref), arrays, nbytes(arrays))
            entries.append(Entry(ref.key, encode_hot(block, FINGERPRINT), block))
    assert tier.put(entries) is not None
    assert tier.flush(10.0)  # a tier that takes them in the background has them now
    return refs


def assert_holds_block(parsed, ref: BlockRef) -> None:
    assert parsed is not None, f"block {ref.index} missed"
    assert np.array_equal(parsed.tokens, block_tokens(ref))
    for name, array in arrays_for(ref.index).items():
        assert np.array_equal(parsed.tensors[name], np.asarray(array))


def test_a_tier_says_which_keys_it_holds_in_one_lookup(tier):
    refs = put_chain(tier, skip=(1,))
    assert isinstance(tier, Tier)
    held = tier.lookup([r.key for r in refs])
    assert set(held) == {refs[0].key, refs[2].key} and all(size > 0 for size in held.values())


def test_a_chain_is_read_ahead_in_order_and_checked(tier):
    refs = put_chain(tier)
    reads = tier.read_ahead(refs, None)
    for ref in refs:
        pending = reads.take(ref.key)
        assert pending is not None
        assert_holds_block(tier.read(ref, block_tokens(ref), "kv", pending), ref)


def test_a_chain_is_read_into_the_prompts_buffers(tier):
    refs = put_chain(tier)
    buffers = PromptBuffers(LAYOUT, capacity=len(TOKENS) + 1)
    reads, found = tier.read_ahead(refs, buffers), Match([])
    for ref in refs:
        parsed = tier.read(ref, block_tokens(ref), "kv", reads.take(ref.key))
        assert parsed is not None
        found.add(Hit(ref, parsed.tokens, BLOCK, parsed.nbytes, parsed=parsed, origin=tier.name), buffers)
    assert_buffers_hold_blocks(buffers, len(refs))


def test_the_read_ahead_stops_at_the_first_block_the_tier_lacks(tier):
    refs = put_chain(tier, skip=(1,))
    reads = tier.read_ahead(refs, None)
    assert reads.take(refs[0].key) is not None
    assert reads.take(refs[2].key) is None  # the chain cannot go past its missing block
    reads.cancel()
    assert_holds_block(tier.read(refs[2], block_tokens(refs[2]), "kv"), refs[2])  # read when asked


def test_other_tokens_or_another_kind_are_a_miss_that_keeps_the_entry(tier):
    refs = put_chain(tier)
    assert tier.read(refs[0], block_tokens(refs[1]), "kv") is None
    assert tier.read(refs[0], block_tokens(refs[0]), "snap") is None
    assert_holds_block(tier.read(refs[0], block_tokens(refs[0]), "kv"), refs[0])


def test_children_are_listed_under_their_parent(tier):
    refs = put_chain(tier)
    assert {k: list(v) for k, v in tier.children(root_key(FINGERPRINT)).items()} == \
        {refs[0].key: list(block_tokens(refs[0]))}
    first = int(block_tokens(refs[1])[0])
    assert set(tier.children(refs[0].key, "kv", first)) == {refs[1].key}
    assert tier.children(refs[0].key, "kv", first + 1) == {}
    assert tier.children(refs[0].key, "snap") == {}


def test_a_damaged_or_dropped_entry_is_gone(tier):
    refs = put_chain(tier)
    tier.damaged(refs[0], "kv", DamagedBlock("found damaged by the test"))
    tier.drop(refs[1])
    assert set(tier.lookup([r.key for r in refs])) == {refs[2].key}
    assert tier.read(refs[0], block_tokens(refs[0]), "kv") is None
    assert tier.children(refs[0].key) == {}


def test_a_tier_reports_itself(tier):
    put_chain(tier)
    assert isinstance(tier.stats(), dict) and isinstance(tier.health(), dict)
    assert tier.take_retry() is False  # nothing failed
    tier.touch([r.key for r in block_refs(TOKENS, BLOCK, FINGERPRINT)])  # best effort, whatever the tier keeps
    tier.add_counters({"requests_hit": 1})


# -- a store with the dict tier below RAM ---------------------------------------------------
def test_a_store_restores_a_prefix_from_a_tier_of_its_own(llama_model, reference, tmp_path):
    """The disk tier off, the dict tier below RAM: a second store (RAM empty) restores the
    conversation's prefix from the dict tier alone, and answers as plain mlx-lm does."""
    config = CacheConfig(cache_dir=tmp_path / "cache", block_size=TEST_BLOCK_SIZE, disk_budget=0)
    engine = Engine(str(llama_model), config)
    entries: dict = {}  # the dict tier's, kept across the two stores as a disk's files are
    messages = agent_messages("dict tier", question="List the files.")
    tokens = engine.renderer.chat_tokens(messages)
    answers, counters, damaged = [], [], 0
    for _ in range(2):  # the first computes and keeps its blocks there; the second restores them
        engine.store.close()
        dict_tier = DictTier(engine.fingerprint, model_fits(engine.layout, engine.plan), entries)
        engine.store = TieredStore(config, engine.fingerprint, engine.layout, engine.plan, extra_tiers=[dict_tier])
        chunks = list(generate(engine, GenerationRequest(list(tokens), MAX_TOKENS, temperature=0.0)))
        engine.store.flush()
        answers.append("".join(c.text for c in chunks))
        counters.append(dict(engine.store.counters))
        damaged += dict_tier.damaged_entries
    engine.close()
    assert [t.name for t in engine.store.tiers] == ["disk", "dict"] and entries and damaged == 0
    assert counters[0]["tokens_from_dict"] == 0 and counters[0]["tokens_computed"] == len(tokens)
    assert counters[1]["tokens_from_dict"] == len(tokens) - 1  # all but the last, always computed
    assert counters[1]["tokens_from_disk"] == counters[1]["tokens_from_ram"] == 0
    assert answers[0] == answers[1] == reference.chat(messages, MAX_TOKENS)
