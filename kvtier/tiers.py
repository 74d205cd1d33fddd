"""The one place that moves blocks between RAM and disk: match, restore, store, spill, flush."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import xxhash

from .blocks import BlockRef, encode_tokens, root_key
from .config import CacheConfig
from .disk import BlockFiles, DamagedBlock, checksum, decode_block, encode_block
from .index import BlockRecord, Index, now_ms
from .kvstate import BlockArrays, Layout, block_nbytes, matches_layout
from .ram import HotBlock, RamTier
from .writer import DiskWriter, WriteJob

log = logging.getLogger("kvtier.tiers")


def tokens_hash(tokens: Sequence[int]) -> str:
    """A second, independent hash of a block's tokens, checked before a file is read."""
    return xxhash.xxh64_hexdigest(encode_tokens(tokens), seed=0x6B76)


@dataclass
class Match:
    blocks: list[HotBlock]
    sources: list[str]  # "ram" or "disk", one per block
    usable: list[int]  # leading tokens of each block that equal the prompt's

    @property
    def num_full_blocks(self) -> int:
        return sum(1 for b, n in zip(self.blocks, self.usable) if n == len(b.tokens))

    @property
    def num_tokens(self) -> int:
        return sum(self.usable)

    def add(self, block: HotBlock, source: str, usable: int) -> None:
        self.blocks.append(block)
        self.sources.append(source)
        self.usable.append(usable)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class TieredStore:
    def __init__(self, config: CacheConfig, fingerprint: str, layout: Layout):
        self.config = config
        self.fingerprint = fingerprint
        self.layout = layout
        config.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.ram = RamTier(config.ram_budget)
        self.index = Index(config.cache_dir / "index")
        self.files = BlockFiles(config.cache_dir / "blocks")
        self.counters: Counter[str] = Counter()
        self._counter_lock = threading.Lock()
        self.disk_error: str | None = None  # last disk failure, cleared by a good write
        self.writer = DiskWriter(self._write_block, config.write_queue_bytes)

    def count(self, name: str, amount: int = 1) -> None:
        with self._counter_lock:
            self.counters[name] += amount

    # -- lookup ------------------------------------------------------------------------
    def match(self, refs: list[BlockRef], tokens: Sequence[int]) -> Match:
        """The longest cached prefix of `tokens`: a chain of full blocks, RAM first then disk,
        then the leading part of one more cached block that continues the chain."""
        size = self.config.block_size
        tokens = np.asarray(tokens, np.uint32)
        found = Match([], [], [])
        for ref in refs:
            block_tokens = tokens[ref.index * size : (ref.index + 1) * size]
            block, source = self._lookup(ref, block_tokens)
            if block is None or not np.array_equal(block.tokens, block_tokens):
                break
            self.ram.pin([ref.key])  # keep this request's earlier blocks while later ones load
            found.add(block, source, size)
        parent = found.blocks[-1].key if found.blocks else root_key(self.fingerprint)
        self._match_tail(parent, len(found.blocks), tokens[len(found.blocks) * size :], found)
        keys = [b.key for b in found.blocks]
        self.ram.unpin(keys)
        self.ram.touch_chain(keys)
        if keys:
            self.index.touch(keys, now_ms())
        return found

    def _lookup(self, ref: BlockRef, block_tokens: np.ndarray) -> tuple[HotBlock | None, str]:
        block = self.ram.get(ref.key)
        if block is not None:
            return block, "ram"
        return self._restore(ref, block_tokens), "disk"

    def _match_tail(self, parent: bytes, index: int, tail: np.ndarray, found: Match) -> None:
        """Reuse the leading tokens of a cached child block: a block's KV for its first k
        tokens depends only on the prefix, so a repeated or extended prompt reuses them."""
        if len(tail) == 0:
            return
        candidates = {b.key: b.tokens for b in self.ram.children(parent)}
        for key, raw in self.index.children(parent):
            candidates.setdefault(key, np.frombuffer(raw, dtype="<u4"))
        best = max(candidates.items(), key=lambda kv: common_prefix(kv[1], tail), default=None)
        if best is None or common_prefix(best[1], tail) == 0:
            return
        key, block_tokens = best
        block, source = self._lookup(BlockRef(key, parent, index), np.asarray(block_tokens, np.uint32))
        if block is not None:
            found.add(block, source, common_prefix(block.tokens, tail))

    def _restore(self, ref: BlockRef, block_tokens: np.ndarray) -> HotBlock | None:
        record = self.index.get(ref.key)
        if record is None:
            return None
        if record.fingerprint != self.fingerprint or record.tokens_hash != tokens_hash(block_tokens):
            self.count("key_collisions")
            return None
        try:
            payload = self.files.read(ref.hex, record.checksum, record.nbytes)
            arrays, stored_tokens = decode_block(payload)
            if (not matches_layout(arrays, self.layout, len(stored_tokens))
                    or not np.array_equal(stored_tokens, block_tokens)):
                raise DamagedBlock("shapes or dtypes differ from this model's KV")
        except DamagedBlock as exc:
            log.warning("block %s is damaged (%s): treated as a miss and dropped", ref.hex, exc)
            self.count("damaged_blocks")
            self.drop(ref.key)
            return None
        block = HotBlock(ref.key, ref.parent, ref.index, stored_tokens, arrays,
                         block_nbytes(arrays), persisted=True)
        self.ram.put(block)
        return block

    # -- store -------------------------------------------------------------------------
    def store(self, ref: BlockRef, tokens: Sequence[int], arrays: BlockArrays) -> None:
        """Keep a newly computed block hot and queue it for the disk.

        A block may be partial (the tail of a request). Any partial sibling whose tokens this
        block starts with is now redundant (the tail match finds them here) and is dropped.
        """
        if ref.key in self.ram:
            return
        block = HotBlock(ref.key, ref.parent, ref.index, np.asarray(tokens, np.uint32),
                         arrays, block_nbytes(arrays))
        for key in self._covered_partials(block):
            self.ram.remove(key)
            self.writer.submit(WriteJob(key, None, None))  # ordered after its pending write
        self.ram.put(block)
        self._submit(block)

    def _covered_partials(self, block: HotBlock) -> list[bytes]:
        siblings = {b.key: b.tokens for b in self.ram.children(block.parent)}
        for key, raw in self.index.children(block.parent):
            siblings.setdefault(key, np.frombuffer(raw, dtype="<u4"))
        return [key for key, tokens in siblings.items()
                if key != block.key and len(tokens) < len(block.tokens)
                and common_prefix(tokens, block.tokens) == len(tokens)]

    def _submit(self, block: HotBlock) -> None:
        if self.config.disk_budget == 0:
            return
        meta = {"key": block.key.hex(), "fingerprint": self.fingerprint}
        self.writer.submit(WriteJob(block.key, encode_block(block.arrays, block.tokens, meta), block))

    # -- disk writer (runs on the writer thread) -----------------------------------------
    def _write_block(self, job: WriteJob) -> None:
        if job.payload is None:
            self.drop(job.key)
            return
        block: HotBlock = job.block
        if self.index.get(job.key) is not None:
            block.persisted = True
            return
        if not self._make_room(len(job.payload)):
            self.count("disk_writes_skipped_budget")
            log.warning("disk budget too small for block %s: kept in RAM only", job.key.hex())
            return
        try:
            nbytes = self.files.write(job.key.hex(), job.payload)
            stamp = now_ms()
            self.index.put(job.key, BlockRecord(
                parent=block.parent.hex(), fingerprint=self.fingerprint, depth=block.index,
                num_tokens=len(block.tokens), nbytes=nbytes, checksum=checksum(job.payload),
                tokens_hash=tokens_hash(block.tokens), access_ms=stamp, created_ms=stamp),
                encode_tokens(block.tokens))
        except OSError as exc:
            self.files.remove(job.key.hex())
            self.count("disk_write_errors")
            if self.disk_error is None:
                log.error("cannot write to %s (%s): serving from RAM only", self.files.root, exc)
            self.disk_error = f"{type(exc).__name__}: {exc.strerror or exc}"
            return
        self.disk_error = None
        self.count("disk_writes")
        self.count("disk_bytes_written", nbytes)
        block.persisted = True

    def disk_used(self) -> int:
        return self.index.totals()[0] + self.index.disk_usage()

    def _make_room(self, nbytes: int) -> bool:
        """Evict least recently used blocks (any model) until `nbytes` more fit the budget."""
        while self.disk_used() + nbytes > self.config.disk_budget:
            victims = self.index.oldest(16)
            if not victims:
                return False
            for key in victims:
                self.drop(key)
                self.count("disk_evictions")
        return True

    def drop(self, key: bytes) -> None:
        """Remove a block from disk: index entry first, then the file."""
        self.index.remove(key)
        self.files.remove(key.hex())

    # -- lifecycle ---------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Persist every hot block not yet on disk (retrying failed writes) and wait."""
        for block in self.ram.unpersisted():
            if not self.writer.is_queued(block.key) and self.index.get(block.key) is None:
                self._submit(block)
        return self.writer.flush(timeout)

    def close(self) -> None:
        self.flush()
        self.writer.close()
        self.index.close()

    def stats(self) -> dict:
        disk_bytes, disk_blocks = self.index.totals()
        queued_jobs, queued_bytes = self.writer.pending
        with self._counter_lock:
            counters = dict(self.counters)
        return {
            "ram": {"blocks": self.ram.num_blocks, "bytes": self.ram.num_bytes,
                    "budget": self.ram.budget},
            "disk": {"blocks": disk_blocks, "bytes": disk_bytes,
                     "index_bytes": self.index.disk_usage(), "budget": self.config.disk_budget,
                     "writable": self.disk_error is None, "error": self.disk_error,
                     "queued_blocks": queued_jobs, "queued_bytes": queued_bytes},
            "block_size": self.config.block_size,
            "counters": counters,
        }
