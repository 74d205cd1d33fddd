"""Finding a prompt's cached prefix: the walk over `[ram, *tiers]` (tier.Tier), nearest tier
first, one read-ahead per tier. A chain of full blocks, then the leading part of one more
block that continues it, then for recurrent layers the snapshot the prefix ends at. Nothing
here names a concrete tier: a tier's traits (`remote`, `durable`) decide."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .blocks import BlockRef, Tokens, block_refs, common_prefix, root_key
from .disk import DamagedBlock, ParsedBlock, to_mlx
from .kvstate import PromptBuffers, Snapshot
from .ram import HotBlock, RamTier
from .readahead import ReadAhead
from .restored import Hit, Match, SnapshotHit
from .tier import Pending, Tier


class Lookup:
    """Lookups over `ram` and `tiers` (nearest first) for one model; a snapshot read from a
    tier below RAM is handed to `keep_hot` (it is used as a hot block)."""

    def __init__(self, ram: RamTier, tiers: list[Tier], block_size: int, fingerprint: str,
                 keep_hot: Callable[[list[HotBlock]], None]):
        self.ram, self.tiers, self.block_size, self.fingerprint = ram, tiers, block_size, fingerprint
        self.keep_hot = keep_hot

    @property
    def local(self) -> list[Tier]:
        return [t for t in self.tiers if not t.remote]

    # -- a chain of blocks ---------------------------------------------------------------
    def match(self, refs: list[BlockRef], tokens: Tokens, into: PromptBuffers | None = None) -> Match:
        """The longest cached prefix of `tokens`: a chain of full blocks, each from the nearest
        tier that holds it, then the leading part of one more cached block that continues
        the chain. Blocks read from a tier go straight into `into` where the tier can (or
        arrive as numpy views: `promote` makes them hot later); each counts once confirmed,
        while later ones are still being read."""
        size = self.block_size
        tokens = np.asarray(tokens, np.uint32)
        found = Match([])
        # The nearest tier's reads start at once (RAM is asked in memory) unless it is remote;
        # a further one's where the chain first passes the tiers above it.
        reads: list[ReadAhead | None] = [None] * len(self.tiers)
        if self.tiers and not self.tiers[0].remote:
            reads[0] = self.tiers[0].read_ahead([r for r in refs if r.key not in self.ram], into)
        try:
            for ref in refs:
                hit = self._chain_hit(ref, tokens[ref.index * size : (ref.index + 1) * size], refs, reads, into)
                if hit is None or len(hit.tokens) != size:
                    break
                found.add(hit, into)
        finally:
            for pending in reads:
                if pending is not None:
                    pending.cancel()  # the chain ended before these
        parent = found.hits[-1].ref.key if found.hits else root_key(self.fingerprint)
        self._match_tail(parent, len(found.hits), tokens[len(found.hits) * size :], found, into)
        return found

    def _chain_hit(self, ref: BlockRef, block_tokens: np.ndarray, refs: list[BlockRef],
                   reads: list[ReadAhead | None], into: PromptBuffers | None) -> Hit | None:
        """The chain's block at `ref`: from a read already started for it (even if RAM has it
        by now: that read may be writing into the prompt's buffers), else RAM, else each tier
        in turn, its read-ahead started here when the chain first reaches it."""
        pending = [r.take(ref.key) if r is not None else None for r in reads]
        if not any(pending) and (hot := self.ram.get(ref.key)) is not None:
            return self._hot_hit(ref, hot, block_tokens)
        for i, tier in enumerate(self.tiers):
            if reads[i] is None:
                reads[i] = tier.read_ahead(refs[ref.index :], into)
                pending[i] = reads[i].take(ref.key)  # type: ignore[union-attr]
            hit = self._tier_hit(tier, ref, block_tokens, pending[i])
            if hit is not None:
                return hit
        return None

    @staticmethod
    def _hot_hit(ref: BlockRef, block: HotBlock, block_tokens: np.ndarray) -> Hit | None:
        if block.kind != "kv" or not np.array_equal(block.tokens[: len(block_tokens)], block_tokens):
            return None
        return Hit(ref, block.tokens, len(block_tokens), block.nbytes, hot=block)

    @staticmethod
    def _tier_hit(tier: Tier, ref: BlockRef, block_tokens: np.ndarray, pending: Pending | None = None) -> Hit | None:
        parsed = tier.read(ref, block_tokens, "kv", pending)
        if parsed is None:
            return None
        return Hit(ref, parsed.tokens.copy(), len(block_tokens), parsed.nbytes, parsed=parsed, origin=tier.name)

    def _lookup(self, ref: BlockRef, block_tokens: np.ndarray) -> Hit | None:
        """The block at `ref` if its tokens start as `block_tokens` do: from RAM, else the
        nearest tier that holds it (a tail candidate one of them listed)."""
        hot = self.ram.get(ref.key)
        if hot is not None:
            return self._hot_hit(ref, hot, block_tokens)
        for tier in self.tiers:
            if (hit := self._tier_hit(tier, ref, block_tokens)) is not None:
                return hit
        return None

    def _match_tail(self, parent: bytes, index: int, tail: np.ndarray, found: Match,
                    into: PromptBuffers | None) -> None:
        """Reuse the leading tokens of a cached child block: a block's KV for its first k
        tokens depends only on the prefix, so a repeated or extended prompt reuses them."""
        if len(tail) == 0:
            return
        first = int(tail[0])  # only a child starting with it shares any token with the tail
        candidates = self.children(parent, first=first, tiers=self.local)
        if max((common_prefix(t, tail) for t in candidates.values()), default=0) < len(tail):
            for tier in self.tiers:  # a remote tier may have a longer one
                if tier.remote:
                    for key, tokens in tier.children(parent, "kv", first).items():
                        candidates.setdefault(key, tokens)
        best = max(candidates.items(), key=lambda kv: common_prefix(kv[1], tail), default=None)
        if best is None or common_prefix(best[1], tail) == 0:
            return
        key, block_tokens = best
        hit = self._lookup(BlockRef(key, parent, index), np.asarray(block_tokens, np.uint32))
        if hit is not None:
            hit.usable = common_prefix(hit.tokens, tail)
            found.add(hit, into)

    def children(self, parent: bytes, kind: str = "kv", first: int | None = None,
                 tiers: Sequence[Tier] | None = None) -> dict[bytes, np.ndarray]:
        """Tokens of every entry of `kind` that continues `parent`, hot or in `tiers` (all of
        them unless told; what a tier lists is a candidate only, checked when read); with
        `first`, only those starting with that token."""
        children = {b.key: b.tokens for b in self.ram.children(parent, kind)
                    if first is None or (len(b.tokens) > 0 and b.tokens[0] == first)}
        for tier in self.tiers if tiers is None else tiers:
            for key, tokens in tier.children(parent, kind, first).items():
                children.setdefault(key, tokens)
        return children

    def prefix_keys(self, tokens: Tokens) -> list[bytes]:
        """The keys of every entry in RAM and the local tiers that holds part of `tokens`: its
        full blocks, the block continuing its tail, and the snapshots along the way."""
        size = self.block_size
        refs = block_refs(tokens, size, self.fingerprint)
        tokens = np.asarray(tokens, np.uint32)
        anchors = [root_key(self.fingerprint)] + [r.key for r in refs]
        keys = [r.key for r in refs]
        tail = tokens[len(refs) * size :]
        keys += [k for k, child in self.children(anchors[-1], tiers=self.local).items() if common_prefix(child, tail) > 0]
        for j, anchor in enumerate(anchors):
            window = tokens[j * size : (j + 1) * size]
            keys += [k for k, after in self.children(anchor, "snap", tiers=self.local).items()
                     if common_prefix(after, window) == len(after)]
        return keys

    def local_children(self, parent: bytes, kind: str = "kv", first: int | None = None) -> dict[bytes, np.ndarray]:
        """`children` in RAM and the local tiers only."""
        return self.children(parent, kind, first, self.local)

    # -- what a live cache is checked against -----------------------------------------------
    def holds_more(self, refs: list[BlockRef], tokens: Sequence[int], n: int) -> bool:
        """True when the local tiers may give more of `tokens` than its first `n`: they hold
        the block that would cover token `n`, or a tail block sharing more of it (a lookup,
        nothing read; remote tiers are not asked)."""
        size = self.block_size
        if n >= len(tokens) - 1:  # the last token is always computed: no tier gives more
            return False
        j = n // size
        if j < len(refs) and (refs[j].key in self.ram or any(t.lookup([refs[j].key]) for t in self.local)):
            return True
        parent = refs[j - 1].key if j else root_key(self.fingerprint)
        tail = np.asarray(tokens[j * size :], np.uint32)
        candidates = self.children(parent, first=int(tail[0]), tiers=self.local)
        return any(common_prefix(t, tail) > n - j * size for t in candidates.values())

    def held_prefix(self, refs: list[BlockRef], tokens: Sequence[int], n: int) -> Match:
        """The full blocks of the first `n` tokens the local tiers hold, in chain order (looked
        up, not read): what a live restore marks used and `keep` need not store again."""
        size, found = self.block_size, Match([])
        chain = refs[: n // size]
        cold = [r.key for r in chain if r.key not in self.ram]
        held = [(tier.name, tier.lookup(cold)) for tier in self.local]
        for ref in chain:
            block_tokens = np.asarray(tokens[ref.index * size : (ref.index + 1) * size], np.uint32)
            hot = self.ram.get(ref.key)
            if hot is not None and hot.kind == "kv" and np.array_equal(hot.tokens, block_tokens):
                found.hits.append(Hit(ref, hot.tokens, size, hot.nbytes, hot=hot))
                continue
            holder = next(((name, sizes[ref.key]) for name, sizes in held if ref.key in sizes), None)
            if hot is not None or holder is None:
                break
            found.hits.append(Hit(ref, block_tokens, size, holder[1], origin=holder[0]))  # `keep` makes it hot
        return found

    # -- snapshots -----------------------------------------------------------------------
    def find_snapshot(self, refs: list[BlockRef], tokens: Tokens, limit: int) -> SnapshotHit | None:
        """The snapshot at the largest position <= `limit` whose prefix equals the prompt's."""
        size = self.block_size
        tokens = np.asarray(tokens, np.uint32)
        for j in range(min(limit // size, len(refs)), -1, -1):
            anchor = refs[j - 1].key if j else root_key(self.fingerprint)
            for key, after in sorted(self.children(anchor, "snap").items(), key=lambda kv: -len(kv[1])):
                position = j * size + len(after)
                if position > limit or position == 0:
                    continue
                if not np.array_equal(after, tokens[j * size : position]):
                    continue
                found = self._lookup_snapshot(BlockRef(key, anchor, j), np.asarray(after, np.uint32))
                if found is not None:
                    block, source = found
                    return SnapshotHit(key, position, Snapshot(block.arrays, block.skeleton or ""), source)
        return None

    def _lookup_snapshot(self, ref: BlockRef, after: np.ndarray) -> tuple[HotBlock, str] | None:
        block = self.ram.get(ref.key)
        if block is not None:
            return (block, "ram") if block.kind == "snap" else None
        for tier in self.tiers:
            parsed = tier.read(ref, after, "snap")
            if parsed is not None:
                block = self._snapshot_block(tier, ref, parsed)
                return (block, tier.name) if block is not None else None
        return None

    def _snapshot_block(self, tier: Tier, ref: BlockRef, parsed: ParsedBlock) -> HotBlock | None:
        """A snapshot read from `tier`, hot from now on (and kept durably if it is not yet)."""
        try:
            block = HotBlock(ref.key, ref.parent, ref.index, parsed.tokens, to_mlx(parsed), parsed.nbytes,
                             kind="snap", skeleton=parsed.metadata.get("skeleton"),
                             persisted=tier.durable, origin=tier.name)
        except DamagedBlock as exc:
            tier.damaged(ref, "snap", exc)
            return None
        self.keep_hot([block])
        return block
