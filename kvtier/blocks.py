"""Token blocks and their chained content hashes.

A block key is xxh3-128(parent key || block tokens as little-endian uint32). The chain's
root is derived from the model fingerprint, so two models (or one model under two versions
of mlx / mlx-lm) never share keys. Keys only address blocks; a hit is always confirmed
against the stored tokens.
"""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import xxhash

from .config import LAYOUT_VERSION, SNAPSHOT_FORMAT

KEY_BYTES = 16
# Token ids, as a list or an array (to a type checker numpy's arrays are no Sequence).
Tokens = Sequence[int] | np.ndarray


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens two token arrays share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def encode_tokens(tokens: Tokens) -> bytes:
    """Canonical, platform-independent token bytes."""
    return np.asarray(tokens, dtype="<u4").tobytes()


def root_key(fingerprint: str) -> bytes:
    return xxhash.xxh3_128_digest(b"kvtier-root\x00" + fingerprint.encode())


def tokens_hash(tokens: Tokens) -> str:
    """A second, independent hash of a block's tokens, checked before a file is read."""
    return xxhash.xxh64_hexdigest(encode_tokens(tokens), seed=0x6B76)


def block_key(parent: bytes, tokens: Tokens) -> bytes:
    """A KV block's key: the hash of its parent's key and its tokens (so of the whole prefix)."""
    return xxhash.xxh3_128_digest(parent + encode_tokens(tokens))


def chain_keys(tokens: Tokens, block_size: int, fingerprint: str,
               partial_tail: bool = False) -> list[bytes]:
    """Keys of every full block of `tokens` (and of the partly filled last one if asked),
    each one covering the whole prefix before it."""
    keys, parent = [], root_key(fingerprint)
    stop = len(tokens) if partial_tail else len(tokens) - block_size + 1
    for start in range(0, stop, block_size):
        parent = block_key(parent, tokens[start : start + block_size])
        keys.append(parent)
    return keys


def snapshot_ref(refs: list["BlockRef"], tokens: Tokens, position: int, block_size: int,
                 fingerprint: str) -> "BlockRef":
    """Where a snapshot taken after `position` tokens lives: its parent (anchor) is the last
    full block before the position, and its key covers the exact prefix it summarises."""
    j = position // block_size
    anchor = refs[j - 1].key if j else root_key(fingerprint)
    after = tokens[j * block_size : position]
    prefix = block_key(anchor, after) if len(after) else anchor
    return BlockRef(xxhash.xxh3_128_digest(b"kvtier-snapshot\x00" + prefix), anchor, j)


def derived_key(kind: str, parent: bytes, tokens: np.ndarray) -> bytes | None:
    """The key a block or snapshot with this parent and these tokens has (as `snapshot_ref` gives it)."""
    prefix = block_key(parent, tokens) if len(tokens) else parent
    if kind == "kv":
        return prefix
    if kind == "snap":
        return xxhash.xxh3_128_digest(b"kvtier-snapshot\x00" + prefix)
    return None


@dataclass(frozen=True)
class BlockRef:
    """Where a block sits in its chain: its key, its parent's key and its index."""

    key: bytes
    parent: bytes
    index: int  # 0 for the first block of a prompt

    @property
    def hex(self) -> str:
        return self.key.hex()


def block_refs(tokens: Tokens, block_size: int, fingerprint: str,
               partial_tail: bool = False) -> list[BlockRef]:
    keys = chain_keys(tokens, block_size, fingerprint, partial_tail)
    parents = [root_key(fingerprint)] + keys[:-1]
    return [BlockRef(k, p, i) for i, (k, p) in enumerate(zip(keys, parents))]


def _hash_file_sample(path: Path, hasher: "xxhash.xxh3_128") -> None:
    """Hash a weight file's size, header and evenly spaced 1 MiB samples.

    Reading every byte of a 30 GB model at each start is too slow; the safetensors header
    (names, shapes, dtypes, offsets) plus samples catches any re-quantized or retrained file.
    """
    size = path.stat().st_size
    hasher.update(f"{path.name}:{size}".encode())
    chunk = 1 << 20
    with path.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little") if path.suffix == ".safetensors" else 0
        f.seek(0)
        hasher.update(f.read(min(size, 8 + header_len)))
        for i in range(16):
            f.seek(max(0, (size - chunk) * i // 15))
            hasher.update(f.read(chunk))


def runtime() -> dict[str, str]:
    """What computes the KV besides the model: the installed mlx and mlx-lm, the device they
    run on and the BLAS behind CPU matmuls. Their kernels round differently from one to the
    next, so KV one computed is not what another would (the text could differ from running
    without a cache)."""
    import mlx.core as mx
    import mlx_lm

    return {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "device": mx.default_device().type.name,
            "blas": blas_library()}


def blas_library() -> str:
    """The OpenBLAS preloaded on Linux (daemon/blas.py), with its version and the CPU kernel it
    picked, or "builtin" (the BLAS mlx ships with, or Accelerate on macOS)."""
    try:
        config = ctypes.CDLL(None).openblas_get_config
    except (AttributeError, OSError):
        return "builtin"
    config.restype = ctypes.c_char_p
    return (config() or b"OpenBLAS").decode(errors="replace")


def model_fingerprint(model_dir: Path, kv_dtype: str, block_size: int, extra: str = "",
                      computed_by: dict[str, str] | None = None) -> str:
    """Everything that changes the KV bytes: weights, config, tokenizer, KV dtype, layout,
    and what computes it (`computed_by`, default the installed `runtime()`)."""
    computed_by = runtime() if computed_by is None else computed_by
    hasher = xxhash.xxh3_128()
    hasher.update(f"layout={LAYOUT_VERSION};snapshot={SNAPSHOT_FORMAT};dtype={kv_dtype};"
                  f"block={block_size};{extra}".encode())
    hasher.update(";".join(f"{k}={v}" for k, v in sorted(computed_by.items())).encode())
    for path in sorted(model_dir.iterdir()):
        if path.suffix in (".safetensors", ".npz", ".gguf"):
            _hash_file_sample(path, hasher)
        elif path.name in ("config.json", "tokenizer.json", "tokenizer_config.json",
                           "special_tokens_map.json", "tokenizer.model", "generation_config.json"):
            hasher.update(path.name.encode() + path.read_bytes())
    return hasher.hexdigest()


def describe_model(model_dir: Path, computed_by: dict[str, str]) -> dict:
    """A short, human-readable description stored next to the fingerprint in the index:
    after an upgrade `kvtier stats` tells the old fingerprint from the new by `runtime`."""
    config = json.loads((model_dir / "config.json").read_text())
    return {"path": str(model_dir), "model_type": config.get("model_type", "?"), "runtime": computed_by}
