"""The hot tier alone (kvtier/ram.py): a byte budget, least recently used out first, victims
handed back to the caller, and blocks held for their disk write never among them."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from kvtier.ram import HotBlock, RamTier

ROOT = b"\0" * 16


def block(name: int, nbytes: int = 100, parent: bytes = ROOT, kind: str = "kv") -> HotBlock:
    return HotBlock(key=bytes([name]) * 16, parent=parent, index=name, tokens=np.zeros(1, np.uint32),
                    arrays={}, nbytes=nbytes, kind=kind)


def keys(blocks: Iterable[HotBlock | None]) -> list[int | None]:
    return [None if b is None else b.index for b in blocks]


def test_put_get_and_lookup_within_budget():
    ram = RamTier(budget=300)
    a, b = block(1), block(2, nbytes=50)
    assert ram.put(a) == [] and ram.put(b) == []
    assert ram.get(a.key) is a and a.key in ram and block(3).key not in ram
    assert ram.lookup([a.key, block(3).key, b.key]) == {a.key: 100, b.key: 50}
    assert ram.usage() == {"blocks": 2, "bytes": 150, "budget": 300, "pending_blocks": 0, "pending_bytes": 0}


def test_a_block_put_behind_is_the_oldest_and_evicts_nothing():
    ram = RamTier(budget=250)
    ram.put(block(1))
    ram.put_behind(block(2))
    ram.put_behind(block(3))  # over budget: nothing leaves
    assert keys([ram.get(k) for k in ram.keys()]) == [3, 2, 1] and ram.num_bytes == 300
    assert keys(ram.put(block(4, nbytes=10))) == [3]  # the next put evicts the oldest first
    assert keys([ram.get(k) for k in ram.keys()]) == [2, 1, 4] and len(ram.children(ROOT)) == 3


def test_over_budget_evicts_least_recently_used_first_and_returns_the_victims():
    ram = RamTier(budget=300)
    for name in (1, 2, 3):
        ram.put(block(name))
    ram.touch_chain([block(1).key])  # 1 is used again: 2 is now the oldest
    victims = ram.put(block(4, nbytes=150))
    assert keys(victims) == [2, 3]  # as many as it takes to fit, oldest first
    assert keys([ram.get(k) for k in ram.keys()]) == [1, 4] and ram.num_bytes == 250


def test_a_block_put_again_is_not_counted_twice_and_becomes_the_newest():
    ram = RamTier(budget=200)
    first = block(1)
    ram.put(first)
    ram.put(block(2))
    assert ram.put(block(1)) == [] and ram.get(first.key) is first  # the one held stays
    assert ram.num_blocks == 2 and ram.num_bytes == 200
    assert keys(ram.put(block(3))) == [2]


def test_a_touched_chain_is_evicted_from_its_tail():
    """touch_chain marks parents newest, so a chain loses its last blocks first and its shared
    head survives."""
    ram = RamTier(budget=1000)
    chain = [block(1), block(2, parent=block(1).key), block(3, parent=block(2).key)]
    for b in chain:
        ram.put(b)
    ram.touch_chain([b.key for b in chain])
    assert keys(ram.shrink_to(100)) == [3, 2]


def test_shrink_to_returns_victims_and_skips_blocks_held_for_their_write():
    ram = RamTier(budget=1000)
    a, b, c = block(1), block(2), block(3)
    for x in (a, b, c):
        ram.put(x)
    ram.hold([a])
    assert keys(ram.shrink_to(100)) == [2, 3]  # a is the oldest, but its file is not written yet
    assert ram.keys() == [a.key] and ram.shrink_to(0) == []
    assert ram.usage()["pending_bytes"] == 100
    assert ram.written([a]) == []  # within the budget of 1000: it stays, now evictable
    assert keys(ram.shrink_to(0)) == [1] and ram.num_bytes == 0


def test_a_block_held_by_two_writes_leaves_only_after_both():
    ram = RamTier(budget=50)
    a = block(1)
    ram.hold([a])
    ram.hold([a])
    assert ram.put(a) == [] and ram.num_bytes == 100  # over budget, held
    assert ram.written([a]) == [] and a.key in ram
    assert keys(ram.written([a])) == [1] and ram.num_bytes == 0


def test_a_newcomer_over_budget_is_itself_the_victim_when_everything_else_is_held():
    ram = RamTier(budget=150)
    a = block(1)
    ram.put(a)
    ram.hold([a])
    assert keys(ram.put(block(2))) == [2] and ram.keys() == [a.key]


def test_children_by_kind_and_after_removal():
    ram = RamTier(budget=10_000)
    parent = block(1)
    kv, snap, other = block(2, parent=parent.key), block(3, parent=parent.key, kind="snap"), block(4)
    for b in (parent, kv, snap, other):
        ram.put(b)
    assert ram.children(parent.key) == [kv]
    assert ram.children(parent.key, kind="snap") == [snap]
    assert ram.children(kv.key) == []
    ram.remove(kv.key)
    ram.remove(kv.key)  # removing what is gone is a no-op
    assert ram.children(parent.key) == [] and ram.children(parent.key, kind="snap") == [snap]
    assert ram.num_bytes == 300 and kv.key not in ram
    ram.shrink_to(0)
    assert ram.children(parent.key, kind="snap") == [] and ram.children(ROOT) == []


def test_unpersisted_lists_what_a_flush_must_still_queue():
    ram = RamTier(budget=10_000)
    written, queued, fresh = block(1), block(2), block(3)
    for b in (written, queued, fresh):
        ram.put(b)
    written.persisted = True
    ram.hold([queued])
    assert ram.unpersisted() == [fresh]
    ram.written([queued])
    assert ram.unpersisted() == [queued, fresh]  # a failed write is queued again by the next flush


def test_clear_empties_every_count():
    ram = RamTier(budget=10_000)
    ram.put(block(1))
    ram.put(block(2, parent=block(1).key))
    ram.clear()
    assert ram.keys() == [] and ram.children(block(1).key) == []
    assert ram.usage() == {"blocks": 0, "bytes": 0, "budget": 10_000, "pending_blocks": 0, "pending_bytes": 0}
