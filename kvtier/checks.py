"""One check of a block or snapshot read from any tier (disk restore, shared store, start-up
prefetch, `kvtier verify`, index rebuild): that it is the entry asked for, whole, and for this
model. Each read path says what it knows to check against and keeps its own accounting of a
failure (a counted miss, a dropped file): this only raises DamagedBlock."""

from __future__ import annotations

from typing import Callable

import numpy as np

from .blocks import derived_key, tokens_hash
from .disk import TOKENS_TENSOR, DamagedBlock, ParsedBlock, content_hash
from .index import BlockRecord


def check_block(parsed: ParsedBlock, key: bytes, kind: str, *, fingerprint: str | None = None,
                tokens: np.ndarray | None = None, record: BlockRecord | None = None,
                parent: bytes | None = None, content: bool = False,
                fits: Callable[[ParsedBlock, str], bool] | None = None) -> None:
    """DamagedBlock unless `parsed` is the entry `key` of `kind` its metadata names, and, for
    each one given: of the model `fingerprint`; holding `tokens`; as its index `record` says;
    keyed by the hash of `parent` and its tokens; its tensors hashing to the `content` hash in
    its file; of a shape `fits` accepts for this model."""
    meta = parsed.metadata
    if meta.get("key", key.hex()) != key.hex() or meta.get("kind", kind) != kind \
            or (fingerprint is not None and meta.get("fingerprint", fingerprint) != fingerprint):
        raise DamagedBlock("key, model or kind differ from the entry asked for")
    if tokens is not None and not np.array_equal(parsed.tokens, tokens):
        raise DamagedBlock("stored tokens differ from the index")
    if record is not None:
        _check_record(parsed, record)
    if parent is not None and derived_key(kind, parent, parsed.tokens) != key:
        raise DamagedBlock("its key is not the hash of its parent and tokens")
    if content and content_hash(dict(parsed.tensors, **{TOKENS_TENSOR: parsed.tokens})) != meta.get("content"):
        raise DamagedBlock("tensors differ from the hash in the file")
    if fits is not None and not fits(parsed, kind):
        raise DamagedBlock("shapes, dtypes or cache classes differ from this model's")


def _check_record(parsed: ParsedBlock, record: BlockRecord) -> None:
    if len(parsed.tokens) != record.num_tokens or tokens_hash(parsed.tokens) != record.tokens_hash:
        raise DamagedBlock("stored tokens differ from the index")
    if record.kind == "kv" and any(t.ndim < 3 or t.shape[2] != record.num_tokens for t in parsed.tensors.values()):
        raise DamagedBlock("array lengths differ from the token count")

