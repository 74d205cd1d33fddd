"""Hot tier: KV blocks in (unified) memory under a byte budget, least recently used first out.

It only picks victims and hands them back; moving anything to disk is the caller's job.
A block held for a queued disk write (`hold` .. `written`) is never a victim: it stays
findable here until its file is indexed, so the tier may exceed its budget by what the
write queue holds (`pending_bytes`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # kvstate pulls in mlx_lm: the CLI uses this module without it
    from .kvstate import BlockArrays


@dataclass(eq=False)
class HotBlock:
    """A KV block, or a snapshot of the non-sliceable layers at a boundary (kind "snap":
    then `parent` is the full block before the boundary and `tokens` the ones after it)."""

    key: bytes
    parent: bytes
    index: int
    tokens: np.ndarray  # uint32, to confirm a hit token by token
    arrays: BlockArrays
    nbytes: int
    kind: str = "kv"
    skeleton: str | None = None  # a snapshot's state layout (see kvstate.Snapshot)
    persisted: bool = False  # True once a durable tier (the disk) holds it, or it came from one
    origin: str = ""  # the tier below RAM it was read from, if any: not written there again
    prefetched: bool = False  # read from disk by the start-up prefetch (reported per request)
    writes: int = 0  # queued disk writes of it: RAM keeps it until they are done


class RamTier:
    """The hot tier: entries are HotBlocks (the store asks it before the tiers below, tier.Tier)."""

    name = "ram"

    def __init__(self, budget: int):
        self.budget = budget
        self._blocks: OrderedDict[bytes, HotBlock] = OrderedDict()
        self._children: dict[bytes, set[bytes]] = {}  # parent key -> keys of hot children
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: bytes) -> HotBlock | None:
        with self._lock:
            return self._blocks.get(key)

    def children(self, parent: bytes, kind: str = "kv") -> list[HotBlock]:
        with self._lock:
            return [b for b in (self._blocks[k] for k in self._children.get(parent, ()))
                    if b.kind == kind]

    def lookup(self, keys: list[bytes]) -> dict[bytes, int]:
        with self._lock:
            return {k: self._blocks[k].nbytes for k in keys if k in self._blocks}

    def keys(self) -> list[bytes]:
        with self._lock:
            return list(self._blocks)

    def stats(self) -> dict:
        return self.usage()

    def close(self) -> None:
        self.clear()

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            return key in self._blocks

    def touch_chain(self, keys: list[bytes]) -> None:
        """Mark a matched chain as most recent, parents last so children are evicted first."""
        with self._lock:
            for key in reversed(keys):
                if key in self._blocks:
                    self._blocks.move_to_end(key)

    def put(self, block: HotBlock) -> list[HotBlock]:
        """Insert a block and return the blocks evicted to stay within budget (never one
        held for its write: then the tier stays above budget until the write is done)."""
        with self._lock:
            if block.key in self._blocks:
                self._blocks.move_to_end(block.key)
                return []
            self._blocks[block.key] = block
            self._children.setdefault(block.parent, set()).add(block.key)
            self._bytes += block.nbytes
            return self._evict_locked(self.budget)

    def put_behind(self, block: HotBlock) -> None:
        """Insert a block as the least recently used one, evicting nothing: the start-up
        prefetch reads the newest entries first, so each it adds is older than those before."""
        with self._lock:
            if block.key in self._blocks:
                return
            self._blocks[block.key] = block
            self._blocks.move_to_end(block.key, last=False)
            self._children.setdefault(block.parent, set()).add(block.key)
            self._bytes += block.nbytes

    def remove(self, key: bytes) -> None:
        with self._lock:
            if key in self._blocks:
                self._forget_locked(self._blocks[key])

    def shrink_to(self, target_bytes: int) -> list[HotBlock]:
        with self._lock:
            return self._evict_locked(target_bytes)

    def hold(self, blocks: list[HotBlock]) -> None:
        """A write of these blocks is queued: keep them until `written` says it is done."""
        with self._lock:
            for block in blocks:
                block.writes += 1

    def written(self, blocks: list[HotBlock]) -> list[HotBlock]:
        """A queued write of these blocks is done (or failed): they may leave again. Returns
        the blocks evicted to get back within budget."""
        with self._lock:
            for block in blocks:
                block.writes -= 1
            return self._evict_locked(self.budget)

    def unpersisted(self) -> list[HotBlock]:
        """Blocks not on disk and not waiting for a write: what a flush or retry must queue."""
        with self._lock:
            return [b for b in self._blocks.values() if not b.persisted and not b.writes]

    def usage(self) -> dict:
        """Blocks and bytes held, and of them those held for queued writes: the only bytes
        that may take the tier above its budget."""
        with self._lock:
            held = [b.nbytes for b in self._blocks.values() if b.writes]
            return {"blocks": len(self._blocks), "bytes": self._bytes, "budget": self.budget,
                    "pending_blocks": len(held), "pending_bytes": sum(held)}

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self._children.clear()
            self._bytes = 0

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    @property
    def num_bytes(self) -> int:
        return self._bytes

    def _evict_locked(self, target_bytes: int) -> list[HotBlock]:
        victims = []
        for key in list(self._blocks):
            if self._bytes <= target_bytes:
                break
            block = self._blocks[key]
            if block.writes:  # not on disk yet: evicting it now would lose it until written
                continue
            self._forget_locked(block)
            victims.append(block)
        return victims

    def _forget_locked(self, block: HotBlock) -> None:
        del self._blocks[block.key]
        siblings = self._children[block.parent]
        siblings.discard(block.key)
        if not siblings:
            del self._children[block.parent]
        self._bytes -= block.nbytes
