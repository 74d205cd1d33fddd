"""What a request asks of the engine and what it gets back: the request, its usage, its text
chunks. Plain data, importing no MLX: routes, the worker and tests build and read these without
loading the engine (import-linter checks it, see pyproject.toml)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class GenerationRequest:
    prompt_tokens: list[int]
    max_tokens: int | None  # None: until EOS, a stop string or cancellation
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # each token's log-probability and its N likeliest alternatives
    boundaries: list[int] = field(default_factory=list)  # message ends: snapshot points
    cancelled: threading.Event = field(default_factory=threading.Event)
    progress: Callable[[int, int], None] | None = None  # (prompt tokens done, total)
    # Told ("restoring", 0), then ("prefilling", prompt tokens restored): the status page's phases.
    phase: Callable[[str, int], None] | None = None
    queued_at: float = field(default_factory=time.perf_counter)  # for the queue-wait metric


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0
    ram_tokens: int = 0
    disk_tokens: int = 0
    shared_tokens: int = 0  # read from the team's shared store (then kept locally)
    live_tokens: int = 0  # of ram_tokens, those of a live cache taken over (no copy)
    prefetched_tokens: int = 0  # of ram_tokens, those the start-up prefetch read from disk
    prefill_seconds: float = 0.0  # restore + prefill, i.e. time to the first token
    restore_seconds: float = 0.0  # finding and loading the cached prefix (RAM or disk)
    restored_bytes: int = 0  # KV and snapshot bytes that prefix occupies
    # Seconds of each step to the first token (buffers, hash, match, snapshot, account, rebuild,
    # prefill, first_token): a few clock reads, for bench/steps.py.
    steps: dict[str, float] = field(default_factory=dict)

    @property
    def cached_tokens(self) -> int:
        return self.ram_tokens + self.disk_tokens + self.shared_tokens

    @property
    def computed_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


@dataclass
class TokenLogprob:
    """One generated token: its bytes, its log-probability, and the most likely tokens at its
    position (the request's `logprobs` of them, most likely first)."""

    token: bytes
    logprob: float
    top: list[tuple[bytes, float]] = field(default_factory=list)


@dataclass
class Chunk:
    """A piece of generated text; the last chunk of a request carries finish_reason."""

    text: str
    finish_reason: str | None = None
    usage: Usage | None = None
    stop_sequence: str | None = None  # which of the request's stop strings ended it
    # The tokens generated since the previous chunk, where the request asked for logprobs
    # (text a stop string may still claim is held back; its tokens come with the next chunk).
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # On a request's first chunk: the prompt's tokens restored from the cache (the restore is
    # over by then), so a stream's start can give the split its end's usage gives.
    cached_tokens: int | None = None
