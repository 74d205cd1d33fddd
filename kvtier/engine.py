"""Load a model, restore the longest cached prefix, prefill the rest, decode. No HTTP here.

One request reads as a straight line: block keys -> longest cached prefix (RAM, then disk;
for recurrent layers, the longest one that also has a snapshot) -> rebuild the prompt cache
-> prefill the remainder in chunks, snapshotting at chosen boundaries -> decode -> store.
Everything in this module runs on the single thread that owns MLX.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import mlx.core as mx
import numpy as np
from jinja2 import TemplateError
from mlx_lm import load as mlx_load
from mlx_lm.sample_utils import make_sampler

from . import kvstate
from .blocks import block_refs, describe_model, model_fingerprint, snapshot_ref
from .config import CacheConfig
from .hub import ModelUnavailable, cached_model
from .stops import StopMatcher
from .tiers import Hit, Match, NewEntry, SnapshotHit, TieredStore, common_prefix

log = logging.getLogger("kvtier.engine")


@dataclass
class GenerationRequest:
    prompt_tokens: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    boundaries: list[int] = field(default_factory=list)  # message ends: snapshot points
    cancelled: threading.Event = field(default_factory=threading.Event)
    progress: Callable[[int, int], None] | None = None  # (prompt tokens done, total)
    queued_at: float = field(default_factory=time.perf_counter)  # for the queue-wait metric


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0
    ram_tokens: int = 0
    disk_tokens: int = 0
    shared_tokens: int = 0  # read from the team's shared store (then kept locally)
    prefill_seconds: float = 0.0  # restore + prefill, i.e. time to the first token
    restore_seconds: float = 0.0  # finding and loading the cached prefix (RAM or disk)
    restored_bytes: int = 0  # KV and snapshot bytes that prefix occupies

    @property
    def cached_tokens(self) -> int:
        return self.ram_tokens + self.disk_tokens + self.shared_tokens

    @property
    def computed_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


@dataclass
class Session:
    """One request between restore and store: what `finish` needs to cut its new blocks."""

    request: GenerationRequest
    match: Match
    reuse: int  # prompt tokens restored from the cache
    hit: SnapshotHit | None
    usage: "Usage"
    prompt_cache: list[Any]  # replaced by the batch's extracted cache when a batch decoded it
    started: float
    points: set[int]  # snapshot positions
    snapshots: dict[int, kvstate.Snapshot] = field(default_factory=dict)
    fed: list[int] = field(default_factory=list)  # generated tokens fed to the cache
    stored_blocks: int = 0  # full prompt blocks already stored by `store_prompt`


@dataclass
class Chunk:
    """A piece of generated text; the last chunk of a request carries finish_reason."""

    text: str
    finish_reason: str | None = None
    usage: Usage | None = None
    stop_sequence: str | None = None  # which of the request's stop strings ended it


# Keys model configs use for the longest sequence the model takes, most common first:
# max_position_embeddings (most mlx-lm models), n_positions and n_ctx (gpt2, gpt_bigcode,
# gptj), max_seq_len (dbrx, mpt), seq_length (qwen v1, chatglm), model_max_length
# (kimi_linear). Mamba2 configs have none: the architecture has no position limit.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length",
                "model_max_length")


def declared_context_length(config: dict) -> int | None:
    """The context limit a model's config.json declares, or None when it declares none.

    Read from the file, not from mlx-lm's ModelArgs: those fill a missing key with a
    dataclass default (Mamba2's 2,056) that is no property of the model. Multimodal
    configs keep the language model's settings in `text_config`, which comes first."""
    for section in (config.get("text_config"), config):
        if not isinstance(section, dict):
            continue
        for key in CONTEXT_KEYS:
            value = section.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def resolve_model_path(model: str) -> Path:
    """A local directory, or a repo id already in the local Hugging Face cache (no download
    here: `kvtier serve` fetches a missing model before it starts, see kvtier.hub)."""
    path = cached_model(model)
    if path is None:
        raise ModelUnavailable(f"model {model!r} is not a directory nor in the Hugging Face cache")
    return path


def fold_system_messages(messages: list[dict]) -> list[dict]:
    """Messages for a chat template that takes a system message only first: each later system
    message is appended to the user message before it, else put before the next user message,
    else becomes a user message of its own."""
    out: list[dict] = []
    pending: list[str] = []  # system texts waiting for the next user message
    for i, message in enumerate(messages):
        if message["role"] == "system" and i > 0:
            if out and out[-1]["role"] == "user" and isinstance(out[-1]["content"], str):
                out[-1] = dict(out[-1], content=f"{out[-1]['content']}\n\n{message['content']}")
            else:
                pending.append(message["content"])
            continue
        if pending and message["role"] == "user" and isinstance(message["content"], str):
            message = dict(message, content="\n\n".join([*pending, message["content"]]))
            pending = []
        out.append(message)
    out.extend({"role": "user", "content": text} for text in pending)
    return out


class Engine:
    def __init__(self, model: str, cache_config: CacheConfig, prefill_step_size: int = 2048):
        self.model_path = resolve_model_path(model)
        self.model_name = model
        self.model, self.tokenizer = mlx_load(str(self.model_path))
        config = json.loads((self.model_path / "config.json").read_text())
        self.context_length = declared_context_length(config)  # None: no limit declared
        self.prefill_step_size = prefill_step_size
        self.block_size = cache_config.block_size
        self.snapshot_every = cache_config.snapshot_every_blocks * cache_config.block_size
        self.quantization = (kvstate.Quantization(cache_config.kv_bits, cache_config.kv_group_size)
                             if cache_config.kv_bits else None)
        self.plan, layout = self._probe()
        # str() of the MLX dtype ("mlx.core.float32"): the form fingerprints have always hashed.
        dtype = str(getattr(mx, next(iter(layout.values()))[1]) if layout else self._param_dtype())
        kv_format = f"q{self.quantization.bits}g{self.quantization.group_size}" if self.quantization else ""
        self.fingerprint = model_fingerprint(self.model_path, dtype, self.block_size, kv_format)
        self.store = TieredStore(cache_config, self.fingerprint, layout, self.plan)
        self.store.register_model(dict(describe_model(self.model_path), name=model))

    def _probe(self) -> tuple[kvstate.CachePlan | None, kvstate.Layout]:
        try:
            plan, layout = kvstate.probe(self.model, self.quantization)
        except kvstate.UnsupportedCache as exc:
            log.warning("prefix reuse disabled for this model: %s", exc)
            return None, {}
        if plan.needs_snapshots:
            kinds = sorted({plan.classes[i] for i in plan.snapshot})
            log.info("layers of type %s are restored from boundary snapshots", ", ".join(kinds))
        return plan, layout

    def _param_dtype(self) -> Any:
        from mlx.utils import tree_flatten

        return next(v for _, v in tree_flatten(self.model.parameters())).dtype

    @property
    def reusable(self) -> bool:
        return self.plan is not None

    @property
    def cache_plan(self) -> kvstate.CachePlan:
        """The plan of a reusable model: only those reach the code that cuts and snapshots caches."""
        assert self.plan is not None
        return self.plan

    # -- tokenization ------------------------------------------------------------------
    def chat_tokens(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        return self._render(messages, tools, add_generation_prompt=True)

    def message_boundaries(self, messages: list[dict], tools: list[dict] | None,
                           tokens: list[int]) -> list[int]:
        """Where the system prompt and the last few messages end in `tokens`: the points a
        later request most likely shares, worth a snapshot for recurrent layers."""
        if not (self.plan and self.plan.needs_snapshots):
            return []
        counts = sorted({1, *range(max(1, len(messages) - 3), len(messages) + 1)})
        full = self._render(messages, tools, add_generation_prompt=True, tokenize=False)
        token_ends = self._token_ends(full, tokens)
        ends = []
        for count in counts:
            if token_ends is not None:  # text renders are cheap; tokenizing a long prompt is not
                partial = self._render(messages[:count], tools, add_generation_prompt=False, tokenize=False)
                ends.append(bisect.bisect_right(token_ends, len(os.path.commonprefix([partial, full]))))
            else:
                partial = self._render(messages[:count], tools, add_generation_prompt=False)
                ends.append(common_prefix(np.asarray(partial), np.asarray(tokens)))
        return sorted(set(e for e in ends if e > 0))

    def _token_ends(self, text: str, tokens: list[int]) -> list[int] | None:
        """Where each of `tokens` ends in `text` (characters), from one tokenization with
        offsets; None when the tokenizer gives no offsets or tokenizes `text` otherwise."""
        try:
            encoded = self.tokenizer._tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ends = [end for _, end in encoded["offset_mapping"]]
        except (AttributeError, KeyError, TypeError, NotImplementedError, ValueError):
            return None
        if list(encoded["input_ids"]) != list(tokens) or ends != sorted(ends):
            return None
        return ends

    def _render(self, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool,
                tokenize: bool = True) -> Any:
        kwargs = {"tools": tools} if tools else {}

        def render(messages: list[dict]) -> Any:
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=tokenize, **kwargs)

        try:
            rendered = render(messages)
        except TemplateError:
            folded = fold_system_messages(messages)
            if folded == messages:
                raise
            # Templates such as Qwen's refuse a system message after the first one.
            rendered = render(folded)
        return list(rendered) if tokenize else rendered

    def text_tokens(self, prompt: str) -> list[int]:
        return list(self.tokenizer.encode(prompt))

    # -- generation --------------------------------------------------------------------
    def generate(self, request: GenerationRequest) -> Iterator[Chunk]:
        session = self.begin(request)
        try:
            self._prefill(session.prompt_cache, request.prompt_tokens, session.reuse, session.points,
                          session.snapshots, request.progress)
            yield from self._decode(request, session.prompt_cache, session.usage, session.fed,
                                    session.started, session.points, session.snapshots)
        finally:
            self.finish(session)

    def begin(self, request: GenerationRequest) -> "Session":
        """Restore the longest cached prefix of the request's prompt into a fresh prompt cache."""
        tokens = request.prompt_tokens
        started = time.perf_counter()
        refs = block_refs(tokens, self.block_size, self.fingerprint)
        buffers = kvstate.PromptBuffers(self.store.layout, capacity=len(tokens) + 1)

        def take(hit: Hit) -> None:  # each cached block, as soon as it is confirmed
            buffers.add(hit.arrays, hit.usable)
            hit.release()  # its file's bytes are copied: let them go

        match = self._match(refs, tokens, take)
        reuse, hit = self._restore_point(refs, tokens, match)
        usage = self._account(match, reuse, len(tokens))
        prompt_cache = self._rebuild(buffers, reuse, hit)
        usage.restore_seconds = time.perf_counter() - started
        usage.restored_bytes = (sum(h.nbytes for h in match.hits) if reuse else 0) + \
            (hit.snapshot.nbytes if hit else 0)
        return Session(request, match, reuse, hit, usage, prompt_cache, started,
                       self._snapshot_points(request, reuse))

    def finish(self, session: "Session") -> None:
        """Store the request's new blocks (prompt and answer) and snapshots, from the cache
        it ends with; mark the reused ones used and promote those read from disk."""
        self.store.mark_used(session.match, session.hit)
        self._promote_restored(session.prompt_cache, session.match, session.reuse)
        self._store_new(session.request.prompt_tokens + session.fed, session.prompt_cache,
                        max(session.match.num_full_blocks, session.stored_blocks), session.snapshots)

    def store_prompt(self, session: "Session") -> None:
        """Store the prompt's blocks as soon as its cache holds exactly the prompt, so that a
        request waiting with the same prefix restores them instead of computing them again."""
        tokens = session.request.prompt_tokens
        self._store_new(tokens, session.prompt_cache, session.match.num_full_blocks, session.snapshots)
        session.snapshots.clear()  # stored; `finish` adds the ones taken later
        session.stored_blocks = len(tokens) // self.block_size

    def abandon(self, session: "Session") -> None:
        """A request dropped before its prefill ended: nothing new to store."""
        self.store.mark_used(session.match, session.hit)
        self._promote_restored(session.prompt_cache, session.match, session.reuse)

    def _match(self, refs: list, tokens: list[int], on_hit: Callable) -> Match:
        if not self.reusable:
            self.store.count("requests_unsupported_model")
            return Match([])
        return self.store.match(refs, tokens, on_hit)

    def _restore_point(self, refs: list, tokens: list[int], match: Match) -> tuple[int, SnapshotHit | None]:
        """Tokens to take from the cache: never the whole prompt (the last one is computed),
        and for recurrent layers only up to a boundary that has a snapshot."""
        limit = min(match.num_tokens, len(tokens) - 1)
        if limit <= 0 or not self.cache_plan.needs_snapshots:
            return max(limit, 0), None
        hit = self.store.find_snapshot(refs, tokens, limit)
        if hit is None:
            self.store.count("snapshot_misses")
            return 0, None
        return hit.position, hit

    def _account(self, match: Match, reuse: int, num_prompt: int) -> Usage:
        usage, left = Usage(prompt_tokens=num_prompt), reuse
        for source, usable in zip(match.sources, match.usable):
            n = min(usable, left)
            setattr(usage, f"{source}_tokens", getattr(usage, f"{source}_tokens") + n)
            left -= n
        deltas = {"tokens_from_ram": usage.ram_tokens, "tokens_from_disk": usage.disk_tokens,
                  "tokens_from_shared": usage.shared_tokens,
                  "tokens_computed": usage.computed_tokens, "requests_hit" if reuse else "requests_miss": 1,
                  # A "hit" of 3 tokens is still a cold request: count the ones served mostly
                  # from the cache apart.
                  "requests_half_cached": int(2 * reuse >= num_prompt)}
        for name, value in deltas.items():
            self.store.count(name, value)
        self.store.add_request_counters(deltas)
        return usage

    def _rebuild(self, buffers: kvstate.PromptBuffers, reuse: int, hit: SnapshotHit | None) -> list[Any]:
        if self.plan is None:  # not reusable
            return kvstate.make_cache(self.model, self.quantization)
        return kvstate.rebuild(self.model, self.plan, buffers, reuse, hit.snapshot if hit else None)

    def _snapshot_points(self, request: GenerationRequest, reuse: int) -> set[int]:
        if not (self.plan and self.plan.needs_snapshots):
            return set()
        end = len(request.prompt_tokens)
        regular = range(self.snapshot_every, end, self.snapshot_every)
        return {p for p in (*request.boundaries, *regular, end) if reuse < p <= end}

    def _prefill(self, prompt_cache: list[Any], tokens: list[int], start: int, points: set[int],
                 snapshots: dict[int, kvstate.Snapshot], progress: Callable | None = None) -> None:
        for _ in self.prefill_chunks(prompt_cache, tokens, start, points, snapshots, progress):
            pass
        mx.clear_cache()

    def prefill_chunks(self, prompt_cache: list[Any], tokens: list[int], start: int, points: set[int],
                       snapshots: dict[int, kvstate.Snapshot], progress: Callable | None = None
                       ) -> Iterator[int]:
        """Compute tokens[start:-1] in chunks of the prefill step, cut at snapshot points;
        yields the tokens computed after each chunk (a batch decodes between chunks)."""
        end = len(tokens) - 1
        cuts = {*range(start + self.prefill_step_size, end, self.prefill_step_size), end}
        cuts |= {p for p in points if p < end}
        position = start
        for cut in sorted(c for c in cuts if c > start):
            self.model(mx.array(tokens[position:cut])[None], cache=prompt_cache)
            mx.eval(kvstate.state_arrays(prompt_cache))
            computed, position = cut - position, cut
            if cut in points:
                snapshots[cut] = kvstate.take_snapshot(prompt_cache, self.cache_plan)
            if progress:
                progress(cut, len(tokens))
            yield computed

    def _decode(self, request: GenerationRequest, prompt_cache: list[Any], usage: Usage, fed: list[int],
                started: float, points: set[int], snapshots: dict[int, kvstate.Snapshot]) -> Iterator[Chunk]:
        if request.seed is not None:
            mx.random.seed(request.seed)
        sampler = make_sampler(temp=request.temperature, top_p=request.top_p)

        def step(token: mx.array) -> mx.array:
            logits = self.model(token[None], cache=prompt_cache)[:, -1, :]
            return sampler(logits - mx.logsumexp(logits, keepdims=True))

        y = step(mx.array(request.prompt_tokens[-1:]))
        if len(request.prompt_tokens) in points:
            snapshots[len(request.prompt_tokens)] = kvstate.take_snapshot(prompt_cache, self.cache_plan)
        mx.async_eval(y)
        detokenizer = self.tokenizer.detokenizer
        detokenizer.reset()
        stops = StopMatcher(request.stop)
        eos = set(self.tokenizer.eos_token_ids)
        finish, matched_stop, n = "length", False, 0
        while n < request.max_tokens:
            # Queue the next step before reading this token: compute overlaps the host side.
            next_y = step(y)
            mx.async_eval(next_y)
            token = y.item()
            if n == 0:
                usage.prefill_seconds = time.perf_counter() - started
            fed.append(token)
            n += 1
            if token in eos:
                finish = "stop"
                break
            usage.completion_tokens += 1
            detokenizer.add_token(token)
            text, matched_stop = stops.feed(detokenizer.last_segment)
            if text:
                yield Chunk(text)
            if matched_stop:
                finish = "stop"
                break
            if request.cancelled.is_set():
                finish = "cancelled"
                self.store.count("requests_cancelled")
                break
            y = next_y
        tail = ""
        if not matched_stop:
            detokenizer.finalize()
            tail, matched_stop = stops.feed(detokenizer.last_segment)
            tail += "" if matched_stop else stops.flush()
        yield Chunk(tail, finish, usage, stops.matched)

    def _promote_restored(self, prompt_cache: list[Any], match: Match, reuse: int) -> None:
        """Blocks read from disk or the shared store become hot, cut from the cache they were
        copied into; only those wholly before `reuse` (the cache holds computed tokens after it)."""
        size, entries = self.block_size, []
        for h in match.hits:
            start = h.ref.index * size
            if h.source != "ram" and h.usable == size and start + size <= reuse:
                entries.append(NewEntry(h.ref, h.tokens, kvstate.slice_block(prompt_cache, self.cache_plan, start,
                                                                             start + size), source=h.source))
        self.store.promote(entries)

    def _store_new(self, sequence: list[int], prompt_cache: list[Any], first_new: int,
                   snapshots: dict[int, kvstate.Snapshot]) -> None:
        """Cut every block the cache now holds, past the reused ones, into the tiers (the
        partly filled last block too), with the snapshots taken on the way: one commit."""
        if self.plan is None:  # not reusable
            return
        held_count = kvstate.cached_tokens(prompt_cache)
        held = sequence[: len(sequence) if held_count is None else held_count]
        if self.plan.needs_snapshots and held:
            snapshots[len(held)] = kvstate.take_snapshot(prompt_cache, self.plan)
        refs = block_refs(held, self.block_size, self.fingerprint, partial_tail=True)
        entries = []
        for ref in refs[first_new:]:
            start = ref.index * self.block_size
            end = min(start + self.block_size, len(held))
            entries.append(NewEntry(ref, held[start:end],
                                    kvstate.slice_block(prompt_cache, self.plan, start, end)))
        for position, snapshot in sorted(snapshots.items()):
            if position <= len(held):
                ref = snapshot_ref(refs, held, position, self.block_size, self.fingerprint)
                start = ref.index * self.block_size
                entries.append(NewEntry(ref, held[start:position], snapshot.arrays, "snap",
                                        snapshot.skeleton))
        self.store.store(entries)

    # -- operations ------------------------------------------------------------------------
    def warm(self, messages: list[dict], tools: list[dict] | None = None, pin: bool = False,
             progress: Callable[[int, int], None] | None = None) -> dict:
        """Prefill a prompt (an agent's system prompt and tools, say) and persist it."""
        tokens = self.chat_tokens(messages, tools)
        request = GenerationRequest(tokens, max_tokens=1, temperature=0.0, progress=progress,
                                    boundaries=self.message_boundaries(messages, tools, tokens))
        usage = list(self.generate(request))[-1].usage
        assert usage is not None  # the last chunk carries it
        self.store.flush()
        pinned = self.pin(tokens) if pin else 0
        return {"tokens": len(tokens), "computed_tokens": usage.computed_tokens, "pinned_entries": pinned}

    def pin(self, tokens: list[int], pinned: bool = True) -> int:
        return self.store.pin_prefix(block_refs(tokens, self.block_size, self.fingerprint), tokens, pinned)

    def close(self) -> None:
        self.store.close()

