"""The one place that moves blocks between RAM and disk: match, restore, store, spill, flush."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import xxhash

from .blocks import BlockRef, encode_tokens
from .config import CacheConfig
from .disk import BlockFiles, DamagedBlock, checksum, decode_block, encode_block
from .index import BlockRecord, Index, now_ms
from .kvstate import BlockArrays, block_nbytes, validate_shapes
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

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


class TieredStore:
    def __init__(self, config: CacheConfig, fingerprint: str, expected_shapes: dict):
        self.config = config
        self.fingerprint = fingerprint
        self.expected_shapes = expected_shapes  # name -> (shape, dtype) of one full block
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
        """The longest chain of blocks, RAM first then disk, whose tokens equal the prompt's."""
        size = self.config.block_size
        found = Match([], [])
        for ref in refs:
            block_tokens = np.asarray(tokens[ref.index * size : (ref.index + 1) * size], np.uint32)
            block, source = self.ram.get(ref.key), "ram"
            if block is None:
                block, source = self._restore(ref, block_tokens), "disk"
            if block is None or not np.array_equal(block.tokens, block_tokens):
                break
            self.ram.pin([ref.key])  # keep this request's earlier blocks while later ones load
            found.blocks.append(block)
            found.sources.append(source)
        keys = [b.key for b in found.blocks]
        self.ram.unpin(keys)
        self.ram.touch_chain(keys)
        if keys:
            self.index.touch(keys, now_ms())
        return found

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
            if not validate_shapes(arrays, self.expected_shapes):
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
        """Keep a newly computed block hot and queue it for the disk."""
        if ref.key in self.ram:
            return
        block = HotBlock(ref.key, ref.parent, ref.index, np.asarray(tokens, np.uint32),
                         arrays, block_nbytes(arrays))
        self.ram.put(block)
        self._submit(block)

    def _submit(self, block: HotBlock) -> None:
        if self.config.disk_budget == 0:
            return
        meta = {"key": block.key.hex(), "fingerprint": self.fingerprint}
        self.writer.submit(WriteJob(block.key, encode_block(block.arrays, block.tokens, meta), block))

    # -- disk writer (runs on the writer thread) -----------------------------------------
    def _write_block(self, job: WriteJob) -> None:
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
                tokens_hash=tokens_hash(block.tokens), access_ms=stamp, created_ms=stamp))
        except OSError as exc:
            self.files.remove(job.key.hex())
            self.count("disk_write_errors")
            if self.disk_error is None:
                log.error("cannot write to %s (%s): serving from RAM only", self.files.root, exc)
            self.disk_error = f"{type(exc).__name__}: {exc.strerror or exc}"
            return
        self.disk_error = None
        self.count("disk_writes")
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
