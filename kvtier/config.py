"""Settings for the cache and the daemon: one dataclass, parsed sizes, platform defaults."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import psutil

# Bumped whenever the on-disk block layout changes; part of every block key's salt.
LAYOUT_VERSION = 1
# The layout of a snapshot's skeleton (version 2 stores `meta_state` beside `state`); also
# part of the salt, so a snapshot of another format is never looked up.
SNAPSHOT_FORMAT = 2

# Chosen by bench/block_size.py (docs/benchmarks.md): from 64 up, restore time is flat, while
# each request's rewritten partial tail block grows with the size; 128 balances that
# against the number of files.
DEFAULT_BLOCK_SIZE = 128

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_size(text: str | int) -> int:
    """Parse '512MB', '4GiB', '1.5g' or a plain byte count into bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (try 512MB, 4GiB or a byte count)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


_DURATIONS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """Parse '30m', '12h', '7d' into seconds."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhdw])\s*", str(text))
    if not match:
        raise ValueError(f"not a duration: {text!r} (try 30m, 12h, 7d)")
    return float(match.group(1)) * _DURATIONS[match.group(2)]


def format_size(num_bytes: int) -> str:
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def default_cache_dir() -> Path:
    if os.environ.get("KVTIER_CACHE_DIR"):
        return Path(os.environ["KVTIER_CACHE_DIR"]).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "kvtier"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "kvtier"


def default_ram_budget() -> int:
    # A fifth of physical memory, capped: the model itself and the OS need the rest.
    return min(psutil.virtual_memory().total // 5, 8 * 2**30)


DEFAULT_DISK_BUDGET = 20 * 10**9


@dataclass
class CacheConfig:
    cache_dir: Path = field(default_factory=default_cache_dir)
    block_size: int = DEFAULT_BLOCK_SIZE
    ram_budget: int = field(default_factory=default_ram_budget)  # bytes of KV held in memory
    disk_budget: int = DEFAULT_DISK_BUDGET  # bytes of files under cache_dir
    write_queue_bytes: int = 512 * 2**20  # blocks waiting for the disk; producers wait when full
    # Models with recurrent / sliding-window layers: snapshot their state every this many
    # blocks of a long prompt (besides message ends and each request's end).
    snapshot_every_blocks: int = 16
    kv_bits: int | None = None  # quantize the KV cache (4 or 8 bits); None keeps the model dtype
    kv_group_size: int = 64
    shared_url: str | None = None  # redis:// or rediss:// of a team's shared tier (shared.py)
    shared_ttl: float | None = None  # seconds a shared entry lives; None: until the store evicts it

    def __post_init__(self) -> None:
        self.cache_dir = Path(self.cache_dir).expanduser()
        if not 16 <= self.block_size <= 8192:
            raise ValueError("block size must be between 16 and 8192 tokens")
        if self.ram_budget < 0 or self.disk_budget < 0:
            raise ValueError("budgets must not be negative")
        if self.kv_bits not in (None, 2, 3, 4, 5, 6, 8):
            raise ValueError("kv bits must be one of 2, 3, 4, 5, 6, 8")


def default_max_batch() -> int:
    # Each running request holds its KV in memory; small machines get fewer at once.
    return 8 if psutil.virtual_memory().total >= 16 * 2**30 else 4


def default_pressure_threshold() -> int:
    # Below a tenth of physical memory free, the OS starts compressing and swapping.
    return psutil.virtual_memory().total // 10


def default_memory_budget() -> int:
    # Three quarters of physical memory: what macOS lets the GPU wire on Apple silicon by
    # default, so weights and hot KV past it would not stay resident anyway.
    return psutil.virtual_memory().total * 3 // 4


@dataclass
class ModelSpec:
    """One model the daemon serves: `--model [NAME=]SOURCE` or a `[[models]]` entry of a
    models file. The first one configured is the default model."""

    source: str  # a model directory or a Hugging Face repo id
    name: str = ""  # how it is listed and logged; default: the source as given
    aliases: list[str] = field(default_factory=list)  # more names; fnmatch globs allowed ("claude-*haiku*")
    max_context: int | None = None  # tokens per request; None: the daemon's --max-context, else the model's
    kv_bits: int | None = None  # None: the daemon's --kv-bits
    kv_group_size: int | None = None  # None: the daemon's --kv-group-size
    pin: bool = False  # loaded at start-up and never unloaded for the budget or the keep-alive

    def __post_init__(self) -> None:
        self.name = self.name or self.source


@dataclass
class ServeConfig:
    model: str  # the default model's source (models[0].source)
    host: str = "127.0.0.1"
    port: int = 8420
    prefill_step_size: int | None = None  # tokens per prefill chunk; None: timed at start-up
    max_tokens_ceiling: int | None = None  # operator cap on any completion; None: until EOS or the context's end
    pressure_below: int = field(default_factory=default_pressure_threshold)  # bytes available
    pressure_keep: float = 0.25  # fraction of the RAM budget kept hot after a spill
    api_key: str | None = None  # required on every route when set
    max_waiting: int = 32  # requests queued for the MLX thread before answering 503
    max_batch: int = field(default_factory=lambda: default_max_batch())  # requests decoded at once
    exact: bool = False  # interleave where batched decode is not bit-identical to decoding alone
    prefetch: int | None = None  # bytes read from disk into RAM at start-up; None: half the RAM budget
    max_context: int | None = None  # tokens per request (prompt + completion); None: the model's
    strict_model_names: bool = False  # refuse names other than the served model's and aliases
    keep_billing_header: bool = False  # keep Claude Code's per-conversation system line
    allowed_hosts: list[str] = field(default_factory=list)  # Host names served besides the bound address
    allowed_origins: list[str] = field(default_factory=list)  # browser origins served, with CORS
    show_previews: bool = False  # /cache/entries shows the start of each prompt's text
    read_timeout: float = 60.0  # seconds to send a request's headers, or its body
    cache: CacheConfig = field(default_factory=CacheConfig)
    models: list[ModelSpec] = field(default_factory=list)  # every model served; the first is the default
    memory_budget: int = field(default_factory=default_memory_budget)  # weights + hot KV of loaded models
    keep_alive: float | None = None  # seconds a model may sit idle before it is unloaded; None: never
    allow_any_model: bool = False  # a request may name a repo id not configured: loaded on demand
    offline: bool = False  # never download a model

    def __post_init__(self) -> None:
        if not self.models:
            self.models = [ModelSpec(self.model)]
        self.model = self.models[0].source
