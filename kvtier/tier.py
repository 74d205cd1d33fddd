"""The interface every tier implements: RAM (ram.py), the shared store (shared.py).

A tier only holds entries; which tier to ask, what to promote and what to evict is the
policy's (tiers.TieredStore). Lookups take a whole chain of keys at once, so a remote tier
answers a chain in one round trip.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol, runtime_checkable


class Count(Protocol):
    """Adds to one of the daemon's counters (by 1 unless told)."""

    def __call__(self, name: str, amount: int = 1) -> None: ...


@runtime_checkable
class Tier(Protocol):
    name: str  # "ram", "disk", "shared": where a hit came from, in stats and usage

    def lookup(self, keys: list[bytes]) -> dict[bytes, int]:
        """Of `keys`, those this tier holds now, with their sizes in bytes."""

    def get(self, key: bytes) -> Any | None:
        """The entry under `key` (a tier's own form: a hot block, a stored value), or None."""

    def put(self, entry: Any) -> Any:
        """Keep `entry` (synchronously or queued, as the tier does)."""

    def remove(self, key: bytes) -> None:
        """Forget `key`; a key the tier does not hold is no error."""

    def keys(self) -> Iterator[bytes]:
        """Every key held (a snapshot of them: the tier may change meanwhile)."""

    def stats(self) -> dict:
        """What the tier holds and how it is doing, as /cache/stats reports it."""

    def close(self) -> None:
        """Let go of the tier's resources (threads, connections)."""
