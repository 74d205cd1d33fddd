"""The shared store (shared.SharedTier) as the tiered store uses it, for one model (tier.Tier):
which of a chain's blocks it holds (one round trip), their values fetched ahead of the restore
and checked as a disk file is (and their key against their parent and tokens), and new
entries uploaded once they are written locally. Best effort and a round trip away: not
durable, remote."""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .blocks import BlockRef, tokens_hash
from .checks import check_block
from .disk import DamagedBlock, ParsedBlock, parse_block
from .kvstate import PromptBuffers
from .ram import HotBlock
from .readahead import ReadAhead, chain_plan
from .shared import SharedTier, Upload, decode_value, encode_value
from .tier import BaseTier, Count
from .writer import Entry

log = logging.getLogger("kvtier.shared")

# Fetched and its header checked: (kind, tokens hash, the value's block file parsed).
Fetched = tuple[str, str, ParsedBlock]


@dataclass
class SharedSize:
    """A block the shared store holds, as the read-ahead plans it."""

    nbytes: int


class SharedIO(BaseTier):
    """Reads and uploads through `shared` for one model (`fingerprint`): values fetched on
    `readers`, checked with `fits` (this model's shapes), hits and damage counted with `count`."""

    name = "shared"
    durable = False  # the server evicts at will (maxmemory, TTL)
    remote = True

    def __init__(self, shared: SharedTier, readers: ThreadPoolExecutor, fingerprint: str,
                 fits: Callable[[ParsedBlock, str], bool], count: Count):
        self.shared, self._readers, self._fingerprint = shared, readers, fingerprint
        self._fits, self._count = fits, count

    def lookup(self, keys: list[bytes]) -> dict[bytes, int]:
        return self.shared.lookup(keys)

    def read_ahead(self, refs: list[BlockRef], into: PromptBuffers | None = None) -> ReadAhead[SharedSize]:
        """The rest of the chain from the shared store: which blocks it holds in one round
        trip, then their values fetched in order, overlapping the restore of earlier ones
        (fetched whole: the restore copies them into `into`)."""
        sizes = self.shared.lookup([ref.key for ref in refs])
        planned = chain_plan(refs, {key: SharedSize(n) for key, n in sizes.items()})
        return ReadAhead(self._readers, self.fetch, planned)

    def fetch(self, key_hex: str, _size: SharedSize | None = None) -> Fetched | None:
        """A shared value, its header and payload checked: (kind, tokens hash, parsed), or
        None when the store does not have it (or cannot be reached)."""
        value = self.shared.get(bytes.fromhex(key_hex))
        if value is None:
            return None
        header, payload = decode_value(value)
        return header.kind, header.tokens_hash, parse_block(payload)

    def read(self, ref: BlockRef, tokens: np.ndarray, kind: str,
             pending: tuple[SharedSize, Future] | None = None) -> ParsedBlock | None:
        """The entry at `ref` from the shared store (its read `pending`, or fetched now), checked
        as a disk file is and its key against its parent and tokens; a damaged value is a
        miss, removed from the store."""
        try:
            fetched = pending[1].result() if pending else self.fetch(ref.hex)
            if fetched is None:
                return None
            stored_kind, stored_tokens_hash, parsed = fetched
            if stored_kind != kind or stored_tokens_hash != tokens_hash(tokens):
                return None  # another entry's tokens, or a collision: not this block
            # Its key checked too: the local index has not vouched for its tokens.
            check_block(parsed, ref.key, kind, fingerprint=self._fingerprint, tokens=tokens,
                        parent=ref.parent if kind == "kv" else None, fits=self._fits)
        except DamagedBlock as exc:
            self.damaged(ref, kind, exc)
            return None
        self._count("shared_hits")
        return parsed

    def children(self, parent: bytes, kind: str = "kv", first: int | None = None) -> dict[bytes, np.ndarray]:
        return {key: tokens for key, tokens in self.shared.children(parent, kind).items()
                if first is None or (len(tokens) > 0 and tokens[0] == first)}

    def put(self, entries: list[Entry]) -> list[Entry]:
        """Queue new entries for the shared store (best effort, in the background): the same
        bytes as their files, with a header to check them by. Not those read from it."""
        uploads = []
        for entry in entries:
            block: HotBlock = entry.block
            if block is None or block.origin == self.name or entry.payload is None:
                continue
            value = encode_value(block.kind, entry.payload, tokens_hash(block.tokens))
            self.shared.put(Upload(block.key, block.parent, block.kind, block.tokens, value))
            uploads.append(entry)
        return uploads

    def damaged(self, ref: BlockRef, kind: str, exc: DamagedBlock) -> None:
        log.warning("shared cache entry %s is damaged (%s): treated as a miss", ref.hex, exc)
        self._count("shared_damaged")
        self.drop(ref, kind)

    def drop(self, ref: BlockRef, kind: str = "kv") -> None:
        self.shared.remove(ref.key, ref.parent, kind)

    def stats(self) -> dict:
        return self.shared.stats()

    def health(self) -> dict:
        # An unreachable shared store degrades nothing: reported, never unhealthy.
        return {"shared_connected": self.shared.connected, "shared_error": self.shared.error}

    def flush(self, timeout: float | None = None) -> bool:
        return self.shared.flush(timeout if timeout is not None else 10.0)  # best effort: never waits long

    def close(self) -> None:
        self.shared.close()
