"""What a load measures that depends only on the model and this machine (the batched-decode
probe's verdict, kvtier/exactness.py), kept in the cache directory so that a restart or the
model's next load recalls it instead of measuring again.

Each result is a small JSON file under CACHE_DIR/measured, named by a hash of its key (a dict
of everything the result depends on: the model's fingerprint, `machine()`, the probe's
version) and holding the key beside the value: a changed key is a miss, and so is a missing,
unreadable or damaged file (the caller measures again)."""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import xxhash

from .blocks import runtime

log = logging.getLogger("kvtier.measured")

DIR_NAME = "measured"


def machine() -> dict[str, str]:
    """What a measurement on this machine depends on beside the model: the platform, the
    mlx and mlx-lm computing, their device and the BLAS behind CPU matmuls (`runtime`)."""
    return {"platform": platform.platform(), "machine": platform.machine(), **runtime()}


def _canonical(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def _path(cache_dir: Path, key: dict[str, Any]) -> Path:
    return Path(cache_dir).expanduser() / DIR_NAME / f"{xxhash.xxh3_64_hexdigest(_canonical(key).encode())}.json"


def recall(cache_dir: Path, key: dict[str, Any]) -> dict | None:
    """The value remembered under exactly `key`, or None."""
    try:
        kept = json.loads(_path(cache_dir, key).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(kept, dict) or kept.get("key") != json.loads(_canonical(key)):
        return None
    value = kept.get("value")
    return value if isinstance(value, dict) else None


def remember(cache_dir: Path, key: dict[str, Any], value: dict) -> None:
    """Keep `value` under `key` (written whole or not at all); a cache directory that takes
    no writes keeps nothing: the next load measures again."""
    path = _path(cache_dir, key)
    try:
        text = json.dumps({"key": key, "value": value})
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as out:
            out.write(text)
        os.replace(out.name, path)
    except (OSError, TypeError, ValueError) as exc:
        log.debug("could not keep a measured result in %s: %s", path.parent, exc)
