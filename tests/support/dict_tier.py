"""A tier of the tests' own (tier.Tier): entries kept in a dict in this process, standing in
for a durable store. It shows what adding a tier takes: this one class, handed to the store
(TieredStore(extra_tiers=...)); it passes the same contract tests as the local disk and the
Redis tier (tests/test_tier_contract.py)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from kvtier.blocks import BlockRef
from kvtier.checks import check_block
from kvtier.disk import DamagedBlock, ParsedBlock, parse_block
from kvtier.kvstate import PromptBuffers
from kvtier.readahead import ReadAhead, chain_plan
from kvtier.tier import BaseTier, Pending
from kvtier.tier_setup import Fits
from kvtier.writer import Entry


@dataclass
class Stored:
    parent: bytes
    kind: str
    tokens: np.ndarray
    payload: bytes  # the block file's bytes, as the writer encoded them

    @property
    def nbytes(self) -> int:
        return len(self.payload)


class DictTier(BaseTier):
    """Entries of one model (`fingerprint`) in a dict (`entries`: those of a tier closed
    before, as a restarted store finds its disk's), checked with `fits` when read."""

    name = "dict"
    durable = True  # RAM may let go of what it holds: it keeps everything until closed
    remote = False

    def __init__(self, fingerprint: str, fits: Fits, entries: dict[bytes, Stored] | None = None):
        self.fingerprint, self._fits = fingerprint, fits
        self.entries: dict[bytes, Stored] = {} if entries is None else entries
        self.damaged_entries = 0
        self._lock = threading.Lock()
        self._readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dict-tier-read")

    def lookup(self, keys: list[bytes]) -> dict[bytes, int]:
        with self._lock:
            return {key: self.entries[key].nbytes for key in keys if key in self.entries}

    def read_ahead(self, refs: list[BlockRef], into: PromptBuffers | None) -> ReadAhead[Stored]:
        with self._lock:
            held = {ref.key: self.entries[ref.key] for ref in refs if ref.key in self.entries}
        return ReadAhead(self._readers, lambda _hex, stored: parse_block(stored.payload), chain_plan(refs, held))

    def read(self, ref: BlockRef, tokens: np.ndarray, kind: str, pending: Pending | None = None) -> ParsedBlock | None:
        with self._lock:
            stored = self.entries.get(ref.key)
        if stored is None or stored.kind != kind or not np.array_equal(stored.tokens, tokens):
            return None  # another entry's tokens (a collision): not this block
        try:
            parsed = pending[1].result() if pending is not None else parse_block(stored.payload)
            check_block(parsed, ref.key, kind, fingerprint=self.fingerprint, tokens=tokens, fits=self._fits)
        except DamagedBlock as exc:
            self.damaged(ref, kind, exc)
            return None
        return parsed

    def children(self, parent: bytes, kind: str = "kv", first: int | None = None) -> dict[bytes, np.ndarray]:
        with self._lock:
            return {key: s.tokens for key, s in self.entries.items()
                    if s.parent == parent and s.kind == kind
                    and (first is None or (len(s.tokens) > 0 and s.tokens[0] == first))}

    def put(self, entries: list[Entry]) -> list[Entry]:
        taken = []
        with self._lock:
            for entry in entries:
                if entry.payload is None:
                    self.entries.pop(entry.key, None)
                elif entry.key not in self.entries and entry.block.origin != self.name:
                    block = entry.block
                    self.entries[entry.key] = Stored(block.parent, block.kind, np.array(block.tokens, np.uint32),
                                                     entry.payload)
                    taken.append(entry)
        return taken

    def drop(self, ref: BlockRef, kind: str = "kv") -> None:
        with self._lock:
            self.entries.pop(ref.key, None)

    def damaged(self, ref: BlockRef, kind: str, exc: DamagedBlock) -> None:
        self.damaged_entries += 1
        self.drop(ref, kind)

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self.entries), "bytes": sum(s.nbytes for s in self.entries.values())}

    def close(self) -> None:
        self._readers.shutdown(wait=True)
