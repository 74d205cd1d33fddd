"""What a restore found and hands on: the hits of a matched prefix (`Hit`, `Match`), the
snapshot it ends at, one `Restore` per request (blocks, snapshot, tokens per tier, step
times) for `keep`, and the entries a request computed (`NewEntry`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import kvstate
from .blocks import BlockRef, block_refs, snapshot_ref
from .disk import ParsedBlock
from .kvstate import BlockArrays, CachePlan, PromptBuffers, Snapshot
from .ram import HotBlock


@dataclass
class Hit:
    """One block of a matched prefix: hot in RAM, or just read from a tier below it."""

    ref: BlockRef
    tokens: np.ndarray
    usable: int  # its leading tokens that equal the prompt's
    nbytes: int
    hot: HotBlock | None = None  # the block in RAM
    parsed: ParsedBlock | None = None  # or its file, as numpy views over the bytes read
    origin: str = ""  # the tier below RAM `parsed` was read from (or, looked up only, that holds it)

    @property
    def source(self) -> str:
        return "ram" if self.hot is not None else self.origin

    @property
    def arrays(self) -> dict:
        """MLX arrays when hot, numpy views of the entry's bytes when read from a tier."""
        if self.hot is not None:
            return self.hot.arrays
        assert self.parsed is not None, "the file's arrays were released"
        return self.parsed.tensors

    def release(self) -> None:
        """Let go of the file's bytes once they have been copied where they are needed."""
        self.parsed = None


@dataclass
class Match:
    hits: list[Hit]

    @property
    def sources(self) -> list[str]:
        return [h.source for h in self.hits]

    @property
    def usable(self) -> list[int]:
        return [h.usable for h in self.hits]

    def num_full_blocks(self, block_size: int) -> int:
        """Blocks of `block_size` tokens used whole. Not a partial tail used whole: the
        request stores the full block that replaces it."""
        return sum(1 for h in self.hits if h.usable == len(h.tokens) == block_size)

    @property
    def num_tokens(self) -> int:
        return sum(self.usable)

    def add(self, hit: Hit, into: PromptBuffers | None) -> None:
        """One more block of the prefix; copied into `into` at once (later files are still
        being read) unless its file was read straight into it, then its file's bytes are let go."""
        self.hits.append(hit)
        if into is not None:
            if hit.parsed is not None and hit.parsed.in_place:
                into.claim(hit.ref.index * len(hit.tokens), hit.usable)
            else:
                into.add(hit.arrays, hit.usable)
            hit.release()


@dataclass
class SnapshotHit:
    key: bytes
    position: int  # prompt tokens the snapshot covers
    snapshot: Snapshot
    source: str


@dataclass
class Restore:
    """What `TieredStore.restore` took from the cache for one prompt, and what `keep` needs
    once the request is done."""

    match: Match  # the cached blocks found (all copied into the prompt's buffers)
    reuse: int  # prompt tokens restored: never the last; for recurrent layers a snapshot's position
    snapshot: SnapshotHit | None  # the recurrent layers' state at `reuse`
    tokens_from: Counter[str] = field(default_factory=Counter)  # `reuse`, by the tier its blocks came from (a live cache's: "ram")
    live_tokens: int = 0  # of `ram_tokens`, those of a live cache taken over (all of them, or none)
    prefetched_tokens: int = 0  # of `ram_tokens`, those the start-up prefetch read from disk
    restored_bytes: int = 0  # KV and snapshot bytes of the restored prefix
    steps: dict[str, float] = field(default_factory=dict)  # seconds: hash, match, snapshot, account
    kept_blocks: int = 0  # full blocks of the request's tokens the tiers hold: new ones follow
    index_counters: dict[str, int] = field(default_factory=dict)  # the request's counts, for `keep`

    @property
    def cached_tokens(self) -> int:
        return sum(self.tokens_from.values())

    @property
    def ram_tokens(self) -> int:
        return self.tokens_from["ram"]

    @property
    def disk_tokens(self) -> int:
        return self.tokens_from["disk"]

    @property
    def shared_tokens(self) -> int:
        return self.tokens_from["shared"]


@dataclass
class NewEntry:
    """A block or snapshot computed by a request, to be kept hot and written to disk."""

    ref: BlockRef
    tokens: Sequence[int] | np.ndarray
    arrays: BlockArrays
    kind: str = "kv"
    skeleton: str | None = None
    source: str = "computed"  # or the tier below RAM a restored block was read from


def step_times(marks: list[float]) -> dict[str, float]:
    """Seconds of a restore's steps, from the clock read at each step's end (and before)."""
    return {name: b - a for name, a, b in zip(("hash", "match", "snapshot", "account"), marks, marks[1:])}


def split_by_tier(restored: Restore, num_prompt: int, tiers: Sequence[str]) -> dict[str, int]:
    """Split the restored tokens by the tier each block came from (into `restored`), and the
    request's counts: tokens from each of `tiers` (by name), computed, hit or miss."""
    reuse, left = restored.reuse, restored.reuse
    if restored.live_tokens:  # a live cache is in memory: all of it counts as RAM's
        restored.tokens_from["ram"], left = reuse, 0
    for hit in restored.match.hits:
        n = min(hit.usable, left)
        restored.tokens_from[hit.source] += n
        if hit.hot is not None and hit.hot.prefetched:
            restored.prefetched_tokens += n
        left -= n
    return {**{f"tokens_from_{name}": restored.tokens_from[name] for name in tiers},
            "tokens_from_live": restored.live_tokens,
            "requests_live": int(restored.live_tokens > 0),
            "tokens_computed": num_prompt - restored.cached_tokens,
            "requests_hit" if reuse else "requests_miss": 1,
            # A "hit" of 3 tokens is still a cold request: count the ones served mostly
            # from the cache apart.
            "requests_half_cached": int(2 * reuse >= num_prompt)}


def computed_entries(prompt_cache: list[Any], plan: CachePlan, sequence: Sequence[int],
                     snapshots: dict[int, Snapshot], kept_blocks: int, block_size: int,
                     fingerprint: str) -> tuple[list[NewEntry], int]:
    """The blocks `prompt_cache` holds of `sequence` past its first `kept_blocks` (the partly
    filled last block too), with `snapshots` and, for recurrent layers, one at its end; and
    the number of tokens it holds."""
    size, snapshots = block_size, dict(snapshots)
    held_count = kvstate.cached_tokens(prompt_cache)
    held = list(sequence[: len(sequence) if held_count is None else held_count])
    if plan.needs_snapshots and held:
        snapshots[len(held)] = kvstate.take_snapshot(prompt_cache, plan)
    refs = block_refs(held, size, fingerprint, partial_tail=True)
    entries = []
    for ref in refs[kept_blocks:]:
        start, end = ref.index * size, min((ref.index + 1) * size, len(held))
        entries.append(NewEntry(ref, held[start:end], kvstate.slice_block(prompt_cache, plan, start, end)))
    for position, snapshot in sorted(snapshots.items()):
        if position <= len(held):
            ref = snapshot_ref(refs, held, position, size, fingerprint)
            entries.append(NewEntry(ref, held[ref.index * size : position], snapshot.arrays, "snap",
                                    snapshot.skeleton))
    return entries, len(held)


def restored_entries(restored: Restore, prompt_cache: list[Any], plan: CachePlan, block_size: int) -> list[NewEntry]:
    """The blocks `restored` read from a tier below RAM, cut back out of the cache they were
    copied into; only those wholly before `reuse` (the cache holds computed tokens after it)."""
    size, entries = block_size, []
    for h in restored.match.hits:
        start = h.ref.index * size
        if h.source != "ram" and h.usable == size and start + size <= restored.reuse:
            arrays = kvstate.slice_block(prompt_cache, plan, start, start + size)
            entries.append(NewEntry(h.ref, h.tokens, arrays, source=h.source))
    return entries
