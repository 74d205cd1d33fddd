"""The local SSD tier (local.LocalDisk) as the store uses it, for one model (tier.Tier): a
chain's records looked up in one index read, their files read ahead straight into a
prompt's buffers, each checked against its record, its tokens and the model's layout;
written by the writer thread; access times and request counters kept in its index."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np

from .blocks import BlockRef, tokens_hash
from .checks import check_block
from .disk import DamagedBlock, ParsedBlock, to_mlx
from .disk_registry import release_disk
from .index import BlockRecord, now_ms
from .kvstate import PromptBuffers
from .local import LocalDisk
from .ram import HotBlock
from .readahead import READ_AHEAD_BYTES, ReadAhead, chain_plan, first_bytes
from .tier import BaseTier, Count, Pending
from .writer import Entry, WriteJob

Fits = Callable[[ParsedBlock, str], bool]


class DiskTier(BaseTier):
    """`disk`'s entries of the model `fingerprint`, read on `readers`, checked with `fits`."""

    name = "disk"
    remote = False

    def __init__(self, disk: LocalDisk, readers: ThreadPoolExecutor, fingerprint: str, fits: Fits,
                 block_size: int, count: Count | None = None):
        """`count`: the store's counter, for what is this model's alone (its writes, its key
        collisions); the disk's events go to every store sharing it (disk_registry)."""
        self.disk, self._readers, self._fingerprint = disk, readers, fingerprint
        self._fits, self._block_size = fits, block_size
        self._count: Count = count or disk.count
        self._own_count = count

    @property
    def durable(self) -> bool:
        return self.disk.disk_enabled

    def lookup(self, keys: list[bytes]) -> dict[bytes, int]:
        return {k: r.nbytes for k, r in self.disk.index.get_many(keys).items()}

    def read_ahead(self, refs: list[BlockRef], into: PromptBuffers | None) -> ReadAhead[BlockRecord]:
        """The files of the chain's blocks up to the first one the index does not hold (the
        chain cannot go past it), read in order: straight into `into` at each block's tokens,
        when given (a chain is used from its first block on, so a block is used at exactly
        its place in the prompt)."""
        planned = chain_plan(refs, self.disk.index.get_many([ref.key for ref in refs]))
        if into is None:
            return ReadAhead(self._readers, self.disk.read_parsed, planned)
        # The buffers' views wait for MLX's zero-fill (~50 ms per 136 MB here): the disk starts meanwhile.
        self._readers.submit(self.disk.files.will_need, first_bytes(planned, READ_AHEAD_BYTES))
        size = self._block_size
        targets = {ref.hex: into.views_at(ref.index * size, size) for ref, _ in planned}

        def read_into(key_hex: str, record: BlockRecord) -> ParsedBlock:
            return self.disk.read_into(key_hex, record, targets.pop(key_hex))
        return ReadAhead(self._readers, read_into, planned)

    def read(self, ref: BlockRef, tokens: np.ndarray, kind: str,
             pending: Pending | None = None) -> ParsedBlock | None:
        """A file read and checked against its index record, its tokens and this model's
        layout; a damaged one is counted, dropped and reported as a miss (None)."""
        record, read = pending if pending is not None else (self.disk.index.get(ref.key), None)
        if record is None or record.kind != kind:
            return None
        if record.fingerprint != self._fingerprint or record.tokens_hash != tokens_hash(tokens):
            self._count("key_collisions")
            return None
        try:
            parsed = read.result() if read else self.disk.read_parsed(ref.hex, record)
            check_block(parsed, ref.key, kind, fingerprint=self._fingerprint, tokens=tokens, fits=self._fits)
        except DamagedBlock as exc:
            self.damaged(ref, kind, exc)
            return None
        return parsed

    def children(self, parent: bytes, kind: str = "kv", first: int | None = None) -> dict[bytes, np.ndarray]:
        return {key: np.frombuffer(raw, dtype="<u4") for key, raw in self.disk.index.children(parent, kind, first)}

    def put(self, entries: list[Entry]) -> list[Entry] | None:
        """Written and indexed together (LocalDisk.write_job); what it wrote now goes on to the
        tier below. While the tier is off, every entry goes on."""
        if not self.durable:
            return entries
        indexed = self.disk.write_job(WriteJob(entries, self._fingerprint), self._count)
        if indexed is None:
            return None
        written = {key for key, _, _ in indexed}
        return [e for e in entries if e.key in written]

    def drop(self, ref: BlockRef, kind: str = "kv") -> None:
        self.disk.drop(ref.key)

    def damaged(self, ref: BlockRef, kind: str, exc: DamagedBlock) -> None:
        self.disk.drop_damaged(ref.key, exc)

    def touch(self, keys: list[bytes]) -> None:
        self.disk.note_in_index(self.disk.index.touch, keys, now_ms())

    def add_counters(self, counters: dict[str, int]) -> None:
        self.disk.note_in_index(self.disk.index.add_counters, self._fingerprint, counters)

    def take_retry(self) -> bool:
        return self.disk.take_retry()

    def stats(self) -> dict:
        stats = self.disk.stats()
        return dict(stats, blocks=stats["entries"])  # "blocks": the old name, kept for clients

    def health(self) -> dict:
        error = self.disk.disk_error
        return {"disk_writable": error is None, "disk_error": error}

    def close(self) -> None:
        release_disk(self.disk, self._own_count)  # closed with the last store using it

    # -- the start-up prefetch (kvtier/prefetch.py) reads the index's newest entries ---------
    def read_hot(self, batch: list[tuple[bytes, BlockRecord]]) -> list[HotBlock]:
        """Entries planned by their records, read in parallel, checked as a restore checks
        them (and their key against parent and tokens), as hot blocks already persisted."""
        reads = [(key, record, self._readers.submit(self.disk.read_parsed, key.hex(), record))
                 for key, record in batch]
        return [b for b in (self._prefetched(key, record, read) for key, record, read in reads) if b is not None]

    def _prefetched(self, key: bytes, record: BlockRecord, read: Future) -> HotBlock | None:
        ref = BlockRef(key, bytes.fromhex(record.parent), record.depth)
        try:
            parsed = read.result()
            # Its key checked too: no prompt's tokens vouch for it, only its record.
            check_block(parsed, key, record.kind, fingerprint=self._fingerprint, record=record,
                        parent=ref.parent if record.kind == "kv" else None, fits=self._fits)
            arrays = to_mlx(parsed)
        except DamagedBlock as exc:
            self.disk.drop_damaged(key, exc)
            return None
        return HotBlock(key, ref.parent, ref.index, parsed.tokens.copy(), arrays, parsed.nbytes, kind=record.kind,
                        skeleton=parsed.metadata.get("skeleton"), persisted=True, prefetched=True)
