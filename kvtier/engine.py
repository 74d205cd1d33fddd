"""Load a model, restore the longest cached prefix, prefill the rest, decode. No HTTP here.

One request reads as a straight line: block keys -> longest cached prefix (RAM, then disk)
-> rebuild the prompt cache -> prefill the remainder in chunks -> decode -> store new blocks.
Everything in this module runs on the single thread that owns MLX.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import mlx.core as mx
from mlx_lm import load as mlx_load
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler

from . import kvstate
from .blocks import block_refs, describe_model, model_fingerprint
from .config import CacheConfig
from .stops import StopMatcher
from .tiers import Match, TieredStore

log = logging.getLogger("kvtier.engine")


@dataclass
class GenerationRequest:
    prompt_tokens: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0
    ram_tokens: int = 0
    disk_tokens: int = 0
    prefill_seconds: float = 0.0  # restore + prefill, i.e. time to the first token

    @property
    def cached_tokens(self) -> int:
        return self.ram_tokens + self.disk_tokens

    @property
    def computed_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


@dataclass
class Chunk:
    """A piece of generated text; the last chunk of a request carries finish_reason."""

    text: str
    finish_reason: str | None = None
    usage: Usage | None = None


def resolve_model_path(model: str) -> Path:
    """A local directory, or a repo id already in the local Hugging Face cache (no download)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, local_files_only=True))


class Engine:
    def __init__(self, model: str, cache_config: CacheConfig, prefill_step_size: int = 2048):
        self.model_path = resolve_model_path(model)
        self.model_name = model
        self.model, self.tokenizer = mlx_load(str(self.model_path))
        self.prefill_step_size = prefill_step_size
        self.block_size = cache_config.block_size
        self.reusable, layout = self._probe()
        dtype = next(iter(layout.values()))[1] if layout else "unknown"
        self.fingerprint = model_fingerprint(self.model_path, dtype, self.block_size)
        self.store = TieredStore(cache_config, self.fingerprint, layout)
        self.store.index.register_model(self.fingerprint, dict(describe_model(self.model_path),
                                                               name=model))

    def _probe(self) -> tuple[bool, dict]:
        try:
            return True, kvstate.probe_layout(self.model)
        except kvstate.UnsupportedCache as exc:
            log.warning("prefix reuse disabled for this model: %s", exc)
            return False, {}

    @property
    def context_length(self) -> int | None:
        args = getattr(self.model, "args", None)
        return getattr(args, "max_position_embeddings", None)

    # -- tokenization ------------------------------------------------------------------
    def chat_tokens(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        kwargs = {"tools": tools} if tools else {}
        return list(self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, **kwargs))

    def text_tokens(self, prompt: str) -> list[int]:
        return list(self.tokenizer.encode(prompt))

    # -- generation --------------------------------------------------------------------
    def generate(self, request: GenerationRequest) -> Iterator[Chunk]:
        tokens = request.prompt_tokens
        started = time.perf_counter()
        match = self._match(tokens)
        usage = Usage(prompt_tokens=len(tokens))
        reuse = self._reuse_length(match, len(tokens), usage)
        prompt_cache = kvstate.rebuild(self.model, [b.arrays for b in match.blocks], reuse)
        self.store.count("tokens_from_ram", usage.ram_tokens)
        self.store.count("tokens_from_disk", usage.disk_tokens)
        self.store.count("tokens_computed", usage.computed_tokens)
        self.store.count("requests_hit" if reuse else "requests_miss")

        fed: list[int] = []
        try:
            yield from self._decode(request, tokens[reuse:], prompt_cache, usage, fed, started)
        finally:
            self._store_new_blocks(tokens + fed, prompt_cache, match.num_full_blocks)

    def _match(self, tokens: list[int]) -> Match:
        if not self.reusable:
            self.store.count("requests_unsupported_model")
            return Match([], [], [])
        return self.store.match(block_refs(tokens, self.block_size, self.fingerprint), tokens)

    def _reuse_length(self, match: Match, num_prompt: int, usage: Usage) -> int:
        """Tokens taken from the cache: never the whole prompt, so the last one is computed."""
        reuse = min(match.num_tokens, num_prompt - 1)
        left = reuse
        for source, usable in zip(match.sources, match.usable):
            n = min(usable, left)
            setattr(usage, f"{source}_tokens", getattr(usage, f"{source}_tokens") + n)
            left -= n
        return reuse

    def _decode(self, request: GenerationRequest, remainder: list[int], prompt_cache: list[Any],
                usage: Usage, fed: list[int], started: float) -> Iterator[Chunk]:
        if request.seed is not None:
            mx.random.seed(request.seed)
        sampler = make_sampler(temp=request.temperature, top_p=request.top_p)
        detokenizer = self.tokenizer.detokenizer
        detokenizer.reset()
        stops = StopMatcher(request.stop)
        eos = set(self.tokenizer.eos_token_ids)
        steps = generate_step(mx.array(remainder), self.model, max_tokens=request.max_tokens,
                              sampler=sampler, prompt_cache=prompt_cache,
                              prefill_step_size=self.prefill_step_size)
        finish, matched_stop = "length", False
        for token, _ in steps:
            if not fed:
                usage.prefill_seconds = time.perf_counter() - started
            fed.append(token)
            if token in eos:
                finish = "stop"
                break
            usage.completion_tokens += 1
            detokenizer.add_token(token)
            text, stopped = stops.feed(detokenizer.last_segment)
            if text:
                yield Chunk(text)
            if stopped:
                finish, matched_stop = "stop", True
                break
            if request.cancelled.is_set():
                finish = "cancelled"
                break
        tail = ""
        if not matched_stop:
            detokenizer.finalize()
            tail, matched_stop = stops.feed(detokenizer.last_segment)
            tail += "" if matched_stop else stops.flush()
        yield Chunk(tail, finish, usage)

    def _store_new_blocks(self, sequence: list[int], prompt_cache: list[Any], first_new: int) -> None:
        """Cut every block the cache now holds, past the reused ones, into the tiers; the
        partly filled last block too, so a repeated or continued request reuses it all."""
        if not self.reusable:
            return
        held = sequence[: kvstate.cached_tokens(prompt_cache)]
        for ref in block_refs(held, self.block_size, self.fingerprint, partial_tail=True)[first_new:]:
            start = ref.index * self.block_size
            end = min(start + self.block_size, len(held))
            self.store.store(ref, held[start:end], kvstate.slice_block(prompt_cache, start, end))

    def close(self) -> None:
        self.store.close()

