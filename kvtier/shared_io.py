"""The shared store as the tiered store uses it: which of a chain's blocks it holds (one round
trip), their values fetched ahead of the restore and checked as a disk file is (and their key
against their parent and tokens), and new entries uploaded once they are written locally."""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .blocks import BlockRef, tokens_hash
from .checks import check_block
from .disk import DamagedBlock, ParsedBlock, parse_block
from .ram import HotBlock
from .readahead import ReadAhead
from .shared import SharedTier, Upload, decode_value, encode_value
from .tier import Count
from .writer import Entry

log = logging.getLogger("kvtier.shared")

# Fetched and its header checked: (kind, tokens hash, the value's block file parsed).
Fetched = tuple[str, str, ParsedBlock]


@dataclass
class SharedSize:
    """A block the shared store holds, as the read-ahead plans it."""

    nbytes: int


class SharedIO:
    """Reads and uploads through `shared` for one model (`fingerprint`): values fetched on
    `readers`, checked with `fits` (this model's shapes), hits and damage counted with `count`."""

    def __init__(self, shared: SharedTier, readers: ThreadPoolExecutor, fingerprint: str,
                 fits: Callable[[ParsedBlock, str], bool], count: Count):
        self.shared, self._readers, self._fingerprint = shared, readers, fingerprint
        self._fits, self._count = fits, count

    def read_ahead(self, refs: list[BlockRef]) -> ReadAhead[SharedSize]:
        """The rest of the chain from the shared store: which blocks it holds in one round
        trip, then their values fetched in order, overlapping the restore of earlier ones."""
        sizes = self.shared.lookup([ref.key for ref in refs])
        planned = []
        for ref in refs:
            if ref.key not in sizes:
                break
            planned.append((ref, SharedSize(sizes[ref.key])))
        return ReadAhead(self._readers, self.fetch, planned)

    def fetch(self, key_hex: str, _size: SharedSize | None = None) -> Fetched | None:
        """A shared value, its header and payload checked: (kind, tokens hash, parsed), or
        None when the store does not have it (or cannot be reached)."""
        value = self.shared.get(bytes.fromhex(key_hex))
        if value is None:
            return None
        header, payload = decode_value(value)
        return header.kind, header.tokens_hash, parse_block(payload)

    def read(self, ref: BlockRef, block_tokens: np.ndarray, kind: str,
             pending: tuple[SharedSize, Future] | None = None) -> ParsedBlock | None:
        """The entry at `ref` from the shared store (its read `pending`, or fetched now), checked
        as a disk file is and its key against its parent and tokens; a damaged value is a
        miss, removed from the store."""
        try:
            fetched = pending[1].result() if pending else self.fetch(ref.hex)
            if fetched is None:
                return None
            stored_kind, stored_tokens_hash, parsed = fetched
            if stored_kind != kind or stored_tokens_hash != tokens_hash(block_tokens):
                return None  # another entry's tokens, or a collision: not this block
            # Its key checked too: the local index has not vouched for its tokens.
            check_block(parsed, ref.key, kind, fingerprint=self._fingerprint, tokens=block_tokens,
                        parent=ref.parent if kind == "kv" else None, fits=self._fits)
        except DamagedBlock as exc:
            log.warning("shared cache entry %s is damaged (%s): treated as a miss", ref.hex, exc)
            self._count("shared_damaged")
            self.shared.remove(ref.key, ref.parent, kind)
            return None
        self._count("shared_hits")
        return parsed

    def upload(self, entries: list[Entry]) -> None:
        """Queue new entries for the shared store (best effort, in the background): the same
        bytes as their files, with a header to check them by."""
        for entry in entries:
            block: HotBlock = entry.block
            if block is None or block.shared or entry.payload is None:
                continue
            value = encode_value(block.kind, entry.payload, tokens_hash(block.tokens))
            self.shared.put(Upload(block.key, block.parent, block.kind, block.tokens, value))
