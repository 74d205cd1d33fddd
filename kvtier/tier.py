"""The interface of a tier below RAM (the local disk, disk_tier.py; the shared store,
shared_io.py; any other), as the store (tiers.TieredStore) walks them: `[ram, *tiers]`.

A tier only holds entries, for one model: which tier to ask, what to promote and what to
evict is the policy's. Lookups take a whole chain of keys at once, so a remote tier answers
a chain in one round trip; reads go through a read-ahead (readahead.py) and come back
checked (checks.check_block): a damaged entry is the tier's to count and drop, and a miss.
Adding a tier is one class (on `BaseTier`, for the optional parts), named in tier_setup.py
or handed to the store (`TieredStore(extra_tiers=...)`, as tests/support/dict_tier.py is).
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # kvstate pulls in mlx_lm: the CLI uses this module without it
    from .blocks import BlockRef
    from .disk import DamagedBlock, ParsedBlock
    from .kvstate import PromptBuffers
    from .readahead import ReadAhead
    from .writer import Entry


class Count(Protocol):
    """Adds to one of the daemon's counters (by 1 unless told)."""

    def __call__(self, name: str, amount: int = 1) -> None: ...


# A read the read-ahead started for one block: what the tier planned it by, and the read.
Pending = tuple[Any, Future]


@runtime_checkable
class Tier(Protocol):
    """A tier below RAM. Its traits (class attributes or properties):

    - `name`: where a hit came from, in stats, usage and counters (`tokens_from_<name>`);
    - `durable`: RAM may let go of a block once this tier holds it (the local disk while it
      takes writes; not a best-effort store whose server evicts at will). New blocks are
      written through the writer thread while some tier is durable;
    - `remote`: a round trip away: asked only where the local tiers end (a chain's rest,
      a longer tail), never to decide whether a live cache is the longest prefix.
    """

    @property
    def name(self) -> str: ...

    @property
    def durable(self) -> bool: ...

    @property
    def remote(self) -> bool: ...

    def lookup(self, keys: list[bytes]) -> dict[bytes, int]:
        """Of `keys`, those this tier holds now, with their sizes in bytes (one round trip)."""

    def read_ahead(self, refs: list[BlockRef], into: PromptBuffers | None) -> ReadAhead:
        """The leading blocks of `refs` this tier holds, read in chain order ahead of their
        use, straight into `into` at each block's place where the tier can (else the hit's
        arrays are copied there)."""

    def read(self, ref: BlockRef, tokens: np.ndarray, kind: str,
             pending: Pending | None = None) -> ParsedBlock | None:
        """The entry at `ref` (its read `pending`, or read now), checked to hold `tokens` of
        `kind` for this model; None for a miss (a damaged entry is counted and dropped)."""

    def children(self, parent: bytes, kind: str = "kv", first: int | None = None) -> dict[bytes, np.ndarray]:
        """Tokens of the entries of `kind` listed under `parent` (candidates, checked when
        read); with `first`, only those starting with that token."""

    def put(self, entries: list[Entry]) -> list[Entry] | None:
        """Keep `entries` (a removal when its payload is None): the entries this tier took
        now, for the tier below it (None: it failed, its error recorded). Runs on the writer
        thread while a tier is durable, else on the caller's."""

    def drop(self, ref: BlockRef, kind: str = "kv") -> None:
        """Forget an entry; one the tier does not hold is no error."""

    def damaged(self, ref: BlockRef, kind: str, exc: DamagedBlock) -> None:
        """An entry read from this tier turned out damaged (`exc` says how): counted, logged
        and dropped; a miss all the same."""

    def touch(self, keys: list[bytes]) -> None:
        """These entries were just used (LRU order, access times); best effort."""

    def add_counters(self, counters: dict[str, int]) -> None:
        """One request's counts, for a tier that keeps them; best effort."""

    def take_retry(self) -> bool:
        """True once after the tier took writes again: what it failed to take is due again."""

    def stats(self) -> dict:
        """What the tier holds and how it is doing, as /cache/stats reports it."""

    def health(self) -> dict:
        """Its part of /health: whether it works now, and why not."""

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for the tier's own background work (uploads); True if done in time."""

    def close(self) -> None:
        """Let go of the tier's resources (threads, connections)."""


class BaseTier:
    """Defaults for the optional parts of `Tier`: no access times or counters, nothing to
    retry or wait for, healthy. A subclass says its name and traits itself."""

    def touch(self, keys: list[bytes]) -> None:
        pass

    def add_counters(self, counters: dict[str, int]) -> None:
        pass

    def take_retry(self) -> bool:
        return False

    def health(self) -> dict:
        return {}

    def flush(self, timeout: float | None = None) -> bool:
        return True

    def close(self) -> None:
        pass
