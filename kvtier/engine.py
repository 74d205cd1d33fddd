"""Load a model; give a request its prompt cache, prefill it, keep what it computed. No HTTP here.

For one request (its prompt rendered by kvtier.prompt, run by kvtier/scheduler.py): `begin`
(`store.restore`: the longest cached prefix: RAM, then disk, then the shared store; for
recurrent layers the longest one that also has a snapshot; the prompt cache rebuilt on it)
-> `prefill_chunks` (the rest in chunks, snapshotting at chosen boundaries) -> the
scheduler decodes -> `finish` (`store.keep`: what it computed).
Everything in this module runs on the single thread that owns MLX.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import mlx.core as mx
from mlx_lm import load as mlx_load
from mlx_lm.utils import load_model

from . import chunk_memory, chunking, kvstate, row_attention
from .blocks import block_refs, describe_model, model_fingerprint, runtime
from .config import CacheConfig
from .hub import ModelUnavailable, cached_model
from .models_memory import parameter_bytes
from .prefetch import Prefetch
from .prompt import Renderer
from .requests import GenerationRequest, Usage
from .tiers import Restore, TieredStore

log = logging.getLogger("kvtier.engine")


def usage_of(restored: Restore, prompt_tokens: int) -> Usage:
    """A request's usage as its restore leaves it: which tier gave how many prompt tokens."""
    return Usage(prompt_tokens, ram_tokens=restored.ram_tokens, disk_tokens=restored.disk_tokens,
                 shared_tokens=restored.shared_tokens, live_tokens=restored.live_tokens,
                 prefetched_tokens=restored.prefetched_tokens, restored_bytes=restored.restored_bytes,
                 steps=dict(restored.steps))


@dataclass
class Session:
    """One request between `begin` (restore) and `finish` (keep)."""

    request: GenerationRequest
    restored: Restore  # what the cache gave it; `store.keep` ends it
    usage: Usage
    prompt_cache: list[Any]  # replaced by the batch's extracted cache when a batch decoded it
    started: float
    points: set[int]  # snapshot positions
    snapshots: dict[int, kvstate.Snapshot] = field(default_factory=dict)
    fed: list[int] = field(default_factory=list)  # generated tokens fed to the cache
    live_epoch: int = 0  # the live caches' epoch it began in: a purge since refuses its cache


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


class ModelReleased(RuntimeError):
    """The engine was closed: its model's memory is released, it serves nothing more."""


class ReleasedModel:
    """What `Engine.model` is after `close`: any use fails, saying why."""

    def __init__(self, name: str):
        self._name = name

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise ModelReleased(f"model {self._name} was closed (unloaded): load it again to use it")

    __call__ = _fail

    def __getattr__(self, attribute: str) -> Any:
        self._fail()


Progress = Callable[[str], None]  # told each phase of a load as it starts (PHASES)
PHASES = ("reading weights", "probing the cache", "timing prefill", "opening the cache")


def _silent(phase: str) -> None:
    """No one follows the load."""


class Engine:
    def __init__(self, model: str, cache_config: CacheConfig,
                 prefill_step_size: int | chunking.PrefillChunk | None = 2048, *, progress: Progress | None = None,
                 earlier: Engine | None = None, names: dict | None = None):
        """`prefill_step_size`: one chunk size, an earlier load's choice, or None: timed on this
        model now, unless an earlier process's fit is kept (kvtier.chunking, .chunk_memory).
        `progress` is told each phase of the load as it starts, in PHASES' order ("timing
        prefill" only when it is timed). `earlier`: this model's engine of
        an earlier load (unloaded since): while the model's files are unchanged (its fingerprint),
        its tokenizer, prompt renderer (with its recent texts) and cache plan are taken over
        instead of being made again. `names`: what the index records of the model beside its
        description (the names a daemon serves it by)."""
        phase = progress or _silent
        self.model_path = resolve_model_path(model)
        self.model_name = model
        same = earlier if earlier is not None and earlier._still_matches(self.model_path, cache_config) else None
        phase("reading weights")
        if same is None:
            self.model, self.tokenizer = mlx_load(str(self.model_path))
        else:
            self.model, self.tokenizer = load_model(self.model_path)[0], same.tokenizer
        self.weight_bytes = parameter_bytes(self.model)  # what the weights take, for a memory budget
        row_attention.install()  # its model module is loaded now: batched rows attend alone
        config = json.loads((self.model_path / "config.json").read_text())
        self.context_length = declared_context_length(config)  # None: no limit declared
        self.vocab_size: int | None = getattr(getattr(self.model, "args", None), "vocab_size", None)
        self.block_size = cache_config.block_size
        self.snapshot_every = cache_config.snapshot_every_blocks * cache_config.block_size
        self.quantization = (kvstate.Quantization(cache_config.kv_bits, cache_config.kv_group_size)
                             if cache_config.kv_bits else None)
        phase("probing the cache")
        self.plan: kvstate.CachePlan | None
        self.layout: kvstate.Layout
        self.plan, self.layout = (same.plan, same.layout) if same is not None else self._probe()
        # None: the fit an earlier load measured on this machine, else timed now (and kept).
        self.prefill_chunk = chunk_memory.choose(self.model, self.model_path, cache_config.cache_dir,
                                                 cache_config.block_size, prefill_step_size,
                                                 timing=lambda: phase("timing prefill"))
        self.prefill_step_size = self.prefill_chunk.tokens
        self.renderer: Renderer = same.renderer if same is not None else Renderer(
            self.tokenizer, boundaries=bool(self.plan and self.plan.needs_snapshots))
        phase("opening the cache")
        self._open_store(cache_config, same.fingerprint if same is not None else None, names or {})

    def _kv_format(self) -> tuple[str, str]:
        """The KV's dtype (str() of the MLX dtype, "mlx.core.float32": the form fingerprints have
        always hashed) and its quantization, as the fingerprint takes them."""
        dtype = str(getattr(mx, next(iter(self.layout.values()))[1]) if self.layout else self._param_dtype())
        return dtype, f"q{self.quantization.bits}g{self.quantization.group_size}" if self.quantization else ""

    def _still_matches(self, model_path: Path, cache_config: CacheConfig) -> bool:
        """Whether a load of `model_path` now would be this engine's model: the same files (its
        fingerprint: config, tokenizer, weights) under the same KV settings."""
        quantization = (kvstate.Quantization(cache_config.kv_bits, cache_config.kv_group_size)
                        if cache_config.kv_bits else None)
        if (model_path, cache_config.block_size, quantization) != (self.model_path, self.block_size,
                                                                   self.quantization) or not self.layout:
            return False
        dtype, kv_format = self._kv_format()
        return model_fingerprint(model_path, dtype, self.block_size, kv_format, runtime()) == self.fingerprint

    def _open_store(self, cache_config: CacheConfig, fingerprint: str | None, names: dict) -> None:
        """The model's store, under its fingerprint (computed unless given: an earlier load's of
        the same files), and its names in the index."""
        dtype, kv_format = self._kv_format()
        computed_by = runtime()  # the mlx / mlx-lm computing the KV: an upgrade is a clean miss
        self.fingerprint = fingerprint or model_fingerprint(self.model_path, dtype, self.block_size, kv_format,
                                                            computed_by)
        self.store = TieredStore(cache_config, self.fingerprint, self.layout, self.plan)
        self.description = {**describe_model(self.model_path, computed_by), "name": self.model_name, **names}
        self.store.register_model(self.description)

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

    def beyond_vocabulary(self, tokens: list[int]) -> int | None:
        """A token id the model has no embedding row for, or None. A tokenizer can hold
        more tokens than the model (added tokens); MLX would read past the table on one."""
        top = max(tokens, default=-1)
        return top if self.vocab_size is not None and top >= self.vocab_size else None

    @property
    def cache_plan(self) -> kvstate.CachePlan:
        """The plan of a reusable model: only those reach the code that cuts and snapshots caches."""
        assert self.plan is not None
        return self.plan

    # -- a request's cache (the scheduler, kvtier/scheduler.py, runs the request) ----------
    def begin(self, request: GenerationRequest) -> Session:
        """Take over the live cache holding the longest prefix of the request's prompt, unless
        the tiers hold a longer one: then restore that into a fresh prompt cache."""
        if isinstance(self.model, ReleasedModel):
            self.model()  # raises ModelReleased: its store is closed too
        live = self.store.live
        started, epoch = time.perf_counter(), live.epoch if live is not None else 0
        if request.phase:
            request.phase("restoring", 0)
        restored, prompt_cache, usage = self._take_live(request) or self._restore(request)
        usage.restore_seconds = time.perf_counter() - started
        if request.phase:
            request.phase("prefilling", restored.reuse)
        return Session(request, restored, usage, prompt_cache, started,
                       self._snapshot_points(request, restored.reuse), live_epoch=epoch)

    def _take_live(self, request: GenerationRequest) -> tuple[Restore, list[Any], Usage] | None:
        tokens = request.prompt_tokens
        hit = self.store.live.best(tokens) if self.store.live is not None else None
        taken = self.store.restore_live(tokens, hit) if hit else None
        if taken is None:
            return None
        restored, prompt_cache = taken
        return restored, prompt_cache, usage_of(restored, len(tokens))

    def _restore(self, request: GenerationRequest) -> tuple[Restore, list[Any], Usage]:
        started, tokens = time.perf_counter(), request.prompt_tokens
        # Allocated before the lookup: MLX zero-fills them while it starts.
        buffers = kvstate.PromptBuffers(self.layout, capacity=len(tokens) + 1)
        allocated = time.perf_counter()
        restored = self.store.restore(tokens, into=buffers)
        looked_up = time.perf_counter()
        prompt_cache = self._rebuild(buffers, restored)
        rebuilt = time.perf_counter()
        usage = usage_of(restored, len(tokens))
        usage.steps.update(buffers=allocated - started, rebuild=rebuilt - looked_up)
        return restored, prompt_cache, usage

    def finish(self, session: Session, live: bool = True) -> None:
        """Keep the request's new blocks (prompt and answer) and snapshots, from the cache it
        ends with; the reused entries are marked used, those read from disk made hot. Its
        cache stays live for a next turn unless `live` is False (it failed: its layers may
        be half-way through a step)."""
        sequence = session.request.prompt_tokens + session.fed
        self.store.keep(session.restored, session.prompt_cache, sequence, session.snapshots)
        if live and self.reusable:
            self.store.offer_live(session.prompt_cache, sequence, session.live_epoch)

    def store_prompt(self, session: Session) -> None:
        """Store the prompt's blocks as soon as its cache holds exactly the prompt, so that a
        request waiting with the same prefix restores them instead of computing them again."""
        self.store.keep_computed(session.restored, session.prompt_cache, session.request.prompt_tokens,
                                 session.snapshots)
        session.snapshots.clear()  # stored; `finish` adds the ones taken later

    def abandon(self, session: Session) -> None:
        """A request dropped before its prefill ended: nothing new to store."""
        self.store.keep(session.restored, session.prompt_cache, sequence=None, snapshots={})

    def _rebuild(self, buffers: kvstate.PromptBuffers, restored: Restore) -> list[Any]:
        if not self.reusable:
            return kvstate.make_cache(self.model, self.quantization)
        snapshot = restored.snapshot.snapshot if restored.snapshot else None
        return kvstate.rebuild(self.model, self.cache_plan, buffers, restored.reuse, snapshot)

    def _snapshot_points(self, request: GenerationRequest, reuse: int) -> set[int]:
        if not (self.plan and self.plan.needs_snapshots):
            return set()
        end = len(request.prompt_tokens)
        regular = range(self.snapshot_every, end, self.snapshot_every)
        return {p for p in (*request.boundaries, *regular, end) if reuse < p <= end}

    def prefill_chunks(self, session: Session) -> Iterator[int]:
        """Compute the prompt past the restored prefix but its last token, in chunks cut where
        `prefill_chunk` says and at snapshot points; yields the tokens computed after each
        chunk (a batch decodes between chunks)."""
        tokens, progress, points = session.request.prompt_tokens, session.request.progress, session.points
        position, end = session.restored.reuse, len(tokens) - 1
        began = time.perf_counter()
        while position < end:
            cut = self.chunk_end(session, position)
            self.model(mx.array(tokens[position:cut])[None], cache=session.prompt_cache)
            mx.eval(kvstate.state_arrays(session.prompt_cache))
            computed, position = cut - position, cut
            if cut in points:
                session.snapshots[cut] = kvstate.take_snapshot(session.prompt_cache, self.cache_plan)
            if progress:
                progress(cut, len(tokens))
            steps = session.usage.steps
            steps["prefill"] = steps.get("prefill", 0.0) + time.perf_counter() - began
            yield computed
            began = time.perf_counter()  # a batch may decode others between chunks

    def chunk_end(self, session: Session, position: int) -> int:
        """Where the chunk starting at `position` ends: the chunk's size, a snapshot point or
        the prompt's last token (computed alone), whichever comes first."""
        points = (p for p in session.points if p > position)
        return min([self.prefill_chunk.next_cut(position), *points, len(session.request.prompt_tokens) - 1])

    def chunk_share(self, session: Session, position: int) -> float:
        """The part of one scheduler step the session's next chunk takes (see chunking.PrefillChunk.share)."""
        return self.prefill_chunk.share(max(1, self.chunk_end(session, position) - position), position)

    # -- operations ------------------------------------------------------------------------
    def prefetch_step(self) -> bool:
        """One slice of the start-up prefetch (TieredStore.prefetch_step); after its last one,
        the newest conversation is made live. False once nothing is left to do."""
        if self.store.prefetch_step():
            return True
        prefetch = self.store.prefetch
        if prefetch is not None and prefetch.stopped is None and prefetch.live_tokens is None:
            revivable = self.store.live is not None and not self.cache_plan.needs_snapshots
            # Oldest first: the live caches drop their oldest entry when full.
            sequences = prefetch.hot_chains(self.store.ram, self.store.fingerprint)
            prefetch.live_tokens = sum(self.revive(tokens) for tokens in sequences) if revivable else 0
            self._tokenize_ahead(prefetch, sequences)
        return False

    def _tokenize_ahead(self, prefetch: Prefetch, sequences: list[list[int]]) -> None:
        """The newest conversations' texts tokenized on a thread of its own, so that their next
        turn after a restart tokenizes only its new text, as a warm turn does (a 16K-token
        prompt whole: about 25 ms)."""

        def tokenize() -> None:
            try:
                prefetch.tokenized_texts = self.renderer.remember(sequences)
            except Exception:  # only a warm-up: prompts are tokenized whole as before
                log.exception("tokenizing the newest conversations ahead failed")
                prefetch.tokenized_texts = 0

        threading.Thread(target=tokenize, name="kvtier-tokenize", daemon=True).start()

    def revive(self, tokens: list[int]) -> int:
        """Rebuild the prompt cache of the conversation holding `tokens` (a chain's, from its
        hot blocks: `Prefetch.hot_chains`) and keep it live, so that after a restart its
        next turn takes it over as a warm turn does, with no copy on its way to the first token. Only for models without
        snapshot layers (a live cache of those serves only a prompt extending its whole
        sequence). The tokens it holds, or 0."""
        live = self.store.live
        if live is None or not tokens:
            return 0
        epoch = live.epoch  # a purge from now on refuses it
        buffers = kvstate.PromptBuffers(self.layout, capacity=len(tokens) + 1)
        held = self.store.match(block_refs(tokens, self.block_size, self.fingerprint), tokens, into=buffers).num_tokens
        if held == 0:
            return 0
        prompt_cache = kvstate.rebuild(self.model, self.cache_plan, buffers, held, None)
        return held if self.store.offer_live(prompt_cache, tokens[:held], epoch, prefetched=True) else 0

    def pin(self, tokens: list[int], pinned: bool = True) -> int:
        return self.store.pin_prefix(tokens, pinned)

    def close(self) -> None:
        """Every hot block written to disk by its return (the store's flush) and the model's
        memory released, weights and hot blocks, even while this object stays referenced (a pool
        keeps its entry): the model is dropped, a later use raises ModelReleased. Twice: nothing."""
        closing = self.close_soon()
        if closing is not None:
            closing.join()

    def close_soon(self) -> threading.Thread | None:
        """`close`, but the hot blocks still queued for disk are written on the returned thread
        while the caller goes on (a daemon loads its next model): join it before anything
        needs them on disk. Each block's memory is released once written. None: closed already."""
        if isinstance(self.model, ReleasedModel):
            return None
        closing = self.store.close_soon()
        self.store.forget_hot()  # the queued writes hold their blocks until written
        model, self.model = self.model, ReleasedModel(self.model_name)
        release_weights(model)
        mx.clear_cache()
        return closing


def release_weights(model: Any) -> None:
    """Drop every array the model's modules hold, now: the modules may sit in reference cycles
    (modules and their parents) that only a full garbage collection would free, and one takes
    0.05-0.4 s in a daemon's heap, on the way to the next model's load."""
    for module in model.modules():
        module.clear()  # an mlx.nn.Module is a dict of its arrays and child modules

