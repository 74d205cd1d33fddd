"""Continuous batching on the MLX thread, over mlx-lm's own `BatchGenerator`.

A request flows: `Engine.begin` restores its cached prefix (`TieredStore.restore`: RAM, then
SSD; snapshots) into its own prompt cache (blocks of it that a member is computing are waited
for, those a decoding member has computed are stored by it first) -> its remainder is prefilled alone, one chunk per
scheduler step, so the streams already decoding get a token between chunks -> its first
token is computed alone (as the sequential path does; the snapshot at the prompt's end is
taken here) -> the cache is merged into the generator's batch (mlx-lm's `insert`,
`BatchKVCache.merge`) and decodes with the others -> when it ends (length, EOS, stop string,
cancel) its cache is extracted (`remove(..., return_prompt_caches=True)`) and `Engine.finish`
stores its new blocks (`TieredStore.keep`).

Batched decode is only used where `measure_exactness` finds it bit-identical to decoding
alone on this machine's backend (a GEMM's rows can depend on the batch size: OpenBLAS,
for one, computes a single row another way than several). Elsewhere the same scheduler
runs a `RowDecoder` in the generator's place: each request decodes its own row in turn.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import mlx.core as mx
import numpy as np
from mlx_lm.generate import BatchGenerator
from mlx_lm.models import cache as mlx_cache
from mlx_lm.sample_utils import make_sampler

from . import kvstate
from .blocks import common_prefix
from .engine import Engine, Session
from .requests import Chunk, GenerationRequest, Usage
from .text import TextStream

log = logging.getLogger("kvtier.batch")

PROBE_STEPS = 4  # decode steps compared per prompt: a difference shows from the first


# -- which models may batch -------------------------------------------------------------
@dataclass
class Exactness:
    exact: bool
    reason: str  # why not, or how it was checked
    max_difference: float | None = None  # largest |logprob| difference measured


def unbatchable_reason(engine: Engine) -> str | None:
    """Why mlx-lm cannot batch this model's cache at all, or None."""
    if not engine.reusable:
        return "its prompt cache cannot be stored"
    for layer in kvstate.make_cache(engine.model, engine.quantization):
        if not hasattr(layer, "merge"):
            return f"mlx-lm cannot batch {type(layer).__name__} layers"
    return None


def measure_exactness(engine: Engine) -> Exactness:
    """Decode a few prompts of different lengths (one past any sliding window) alone and
    joined into one batch at different steps; exact only if every log-probability of every
    step is bit-identical."""
    reason = unbatchable_reason(engine)
    if reason:
        return Exactness(False, reason)
    windows = [layer.max_size for layer in kvstate.make_cache(engine.model, engine.quantization)
               if isinstance(layer, mlx_cache.RotatingKVCache)]
    lengths = [5, 37, min(max(windows) + 23, 1024) if windows else 20]
    rng = np.random.default_rng(0)
    vocab = min(getattr(getattr(engine.model, "args", None), "vocab_size", 256) or 256, 1000)
    prompts = [rng.integers(10, vocab, n).tolist() for n in lengths]
    alone = [_decode_alone(engine, p) for p in prompts]
    together = _decode_batched(engine, prompts, join_at=[0, 0, 1])
    worst, exact = 0.0, True
    for mine, theirs in zip(together, alone):
        for a, b in zip(mine, theirs):
            worst = max(worst, float(mx.max(mx.abs(a - b)).item()))
            exact &= bool(mx.array_equal(a, b).item())
    mx.clear_cache()
    if exact:
        return Exactness(True, f"batched decode measured bit-identical at start-up ({len(prompts)} prompts)", 0.0)
    return Exactness(False, f"batched decode differs from decoding alone on this backend "
                            f"(max |logprob difference| {worst:.3g})", worst)


def _prefilled(engine: Engine, tokens: list[int]) -> list[Any]:
    prompt_cache = kvstate.make_cache(engine.model, engine.quantization)
    engine.model(mx.array(tokens[:-1])[None], cache=prompt_cache)
    mx.eval(kvstate.state_arrays(prompt_cache))
    return prompt_cache


def _logprobs(engine: Engine, token: int, prompt_cache: list[Any]) -> mx.array:
    logits = engine.model(mx.array([[token]]), cache=prompt_cache)[:, -1, :]
    return (logits - mx.logsumexp(logits, axis=-1, keepdims=True))[0]


def _decode_alone(engine: Engine, tokens: list[int]) -> list[mx.array]:
    prompt_cache, token, out = _prefilled(engine, tokens), tokens[-1], []
    for _ in range(PROBE_STEPS):
        out.append(_logprobs(engine, token, prompt_cache))
        token = int(mx.argmax(out[-1]).item())
    return out[1:]  # the first step is computed alone on either path


def _decode_batched(engine: Engine, prompts: list[list[int]], join_at: list[int]) -> list[list[mx.array]]:
    generator = BatchGenerator(engine.model, stop_tokens=[], completion_batch_size=len(prompts))
    out: dict[int, list[mx.array]] = {}
    uids: list[int] = []
    try:
        for step in range(PROBE_STEPS + max(join_at)):
            for i in (i for i, at in enumerate(join_at) if at == step):
                prompt_cache = _prefilled(engine, prompts[i])
                first = int(mx.argmax(_logprobs(engine, prompts[i][-1], prompt_cache)).item())
                (uid,) = generator.insert([[first]], max_tokens=[PROBE_STEPS - 1], caches=[prompt_cache],
                                          all_tokens=[list(prompts[i])])
                uids.append(uid)
                out[uid] = []
            for response in generator.next()[1]:
                out[response.uid].append(response.logprobs)
    finally:
        generator.close()
    return [out[uid] for uid in uids]


def steps_left(request: GenerationRequest) -> int:
    """Decode steps the generator may take after a request's first token; a request with no
    limit gets a count it never reaches (its TextStream ends it: EOS, a stop string, cancelling)."""
    return sys.maxsize if request.max_tokens is None else request.max_tokens - 1


# -- exact interleaving: each request decodes its own row ---------------------------------
@dataclass
class RowResponse:
    """What `RowDecoder.next` returns per request: the fields of mlx-lm's batch responses
    that `Batch` reads."""

    uid: int
    token: int
    logprobs: mx.array  # of the step that produced `token`
    finish_reason: str | None
    prompt_cache: list[Any] | None


@dataclass(eq=False)
class _Row:
    prompt_cache: list[Any]
    sampler: Callable
    left: int  # tokens it may still return
    y: mx.array  # its next token, computed (or queued) but not yet returned
    logprobs: mx.array | None = None  # the log-probabilities y was sampled from


class RowDecoder:
    """BatchGenerator's `insert` / `next` / `remove` for backends whose batched decode is
    not bit-exact: each request decodes alone over its own prompt cache, one forward pass
    of one row per step, the sequential path's arithmetic exactly. The requests still take
    turns token by token, so none waits for another to finish.

    As on the sequential path, a request's next token is queued before its last one is
    read (compute overlaps the host side), so a returned token is already in its cache."""

    def __init__(self, model: Any):
        self.model = model
        self.rows: dict[int, _Row] = {}
        self._next_uid = 0

    def _step(self, row: _Row, token: mx.array) -> None:
        """Queue the row's step on `token`: its next token and the log-probabilities behind it."""
        logits = self.model(token[None], cache=row.prompt_cache)[:, -1, :]
        row.logprobs = logits - mx.logsumexp(logits, keepdims=True)
        row.y = row.sampler(row.logprobs)

    def insert(self, tokens: list[list[int]], max_tokens: list[int], caches: list[list[Any]],
               samplers: list[Callable], **_: Any) -> list[int]:
        uids = []
        for (token,), left, prompt_cache, sampler in zip(tokens, max_tokens, caches, samplers):
            row = _Row(prompt_cache, sampler, left, mx.array([token]))
            self._step(row, row.y)
            mx.async_eval(row.y, row.logprobs)
            uids.append(self._next_uid)
            self.rows[self._next_uid] = row
            self._next_uid += 1
        return uids

    def next(self) -> tuple[None, list[RowResponse]]:
        """One token of every row: queue each row's following step, then read the tokens."""
        ready = {uid: (row.y, row.logprobs) for uid, row in self.rows.items()}
        for row in self.rows.values():
            self._step(row, row.y)
        mx.async_eval([(row.y, row.logprobs) for row in self.rows.values()])
        responses = []
        for uid, (y, logprobs) in ready.items():
            row = self.rows[uid]
            row.left -= 1
            done = row.left <= 0
            responses.append(RowResponse(uid, y.item(), logprobs, "length" if done else None,
                                         row.prompt_cache if done else None))
            if done:
                del self.rows[uid]
        return None, responses

    def remove(self, uids: list[int], return_prompt_caches: bool = False) -> dict[int, tuple]:
        removed = {uid: (self.rows.pop(uid).prompt_cache,) for uid in uids}
        return removed if return_prompt_caches else {}

    def close(self) -> None:
        self.rows.clear()


# -- the batch ---------------------------------------------------------------------------
@dataclass(eq=False)  # one request: found in the queues by identity
class Member:
    session: Session
    emit: Callable[[object], None]
    prompt: np.ndarray  # its prompt's tokens, compared with those of requests arriving
    text: TextStream
    chunks: Any  # the prefill's chunk iterator
    remaining: int  # prompt tokens still to prefill (the last one is decoded)
    sampler: Callable | None = None  # set when its first token is sampled


@dataclass
class Held:
    """A request whose prompt shares blocks another member is computing: it is restored
    once they are stored, instead of computing them a second time."""

    request: GenerationRequest
    emit: Callable[[object], None]
    computing: Member


@dataclass
class BatchStats:
    """Totals since start-up; rates are derived from them."""

    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    longest_step_gap: float = 0.0  # longest time between two decode steps of a running batch


class Batch:
    """The requests the MLX thread is serving at once; `step` advances them all a little."""

    def __init__(self, engine: Engine, max_size: int, done: object, interleaved: bool = False):
        self.engine, self.max_size, self.done = engine, max_size, done
        self.interleaved = interleaved  # each request decodes its own row: no batched arithmetic
        self.generator = self._new_generator()
        self.prefilling: deque[Member] = deque()
        self.decoding: dict[int, Member] = {}
        self.held: list[Held] = []
        self.stats = BatchStats()
        self._last_step: float | None = None

    def _new_generator(self) -> BatchGenerator | RowDecoder:
        if self.interleaved:
            return RowDecoder(self.engine.model)
        return BatchGenerator(self.engine.model, stop_tokens=[], completion_batch_size=self.max_size,
                              prefill_batch_size=self.max_size,
                              prefill_step_size=self.engine.prefill_step_size)

    def __len__(self) -> int:
        return len(self.prefilling) + len(self.decoding) + len(self.held)

    @property
    def idle(self) -> bool:
        return not len(self)

    @property
    def full(self) -> bool:
        return len(self) >= self.max_size

    def add(self, request: GenerationRequest, emit: Callable[[object], None]) -> None:
        """Restore the request's cached prefix now; its prefill runs over the next steps. If a
        member is computing blocks this prompt starts with, wait for them instead; if one
        decoding has computed them, it stores them first."""
        tokens = np.asarray(request.prompt_tokens)
        computing = self._computing_prefix_of(tokens)
        if computing is not None:
            self.held.append(Held(request, emit, computing))
            return
        self._store_prompts_shared_with(tokens)
        self._start(request, emit, tokens)

    def _computing_prefix_of(self, tokens: np.ndarray) -> Member | None:
        size = self.engine.block_size
        for member in self.prefilling:
            if common_prefix(member.prompt, tokens) // size > member.session.restored.reuse // size:
                return member
        return None

    def _store_prompts_shared_with(self, tokens: np.ndarray) -> None:
        """A decoding member stores its blocks when it ends; one whose prompt shares blocks
        with `tokens` that the tiers do not hold yet stores its prompt's now, from its own
        cache (the generator decodes a merged copy), so this request restores them."""
        size = self.engine.block_size
        for member in self.decoding.values():
            if common_prefix(member.prompt, tokens) // size > member.session.restored.kept_blocks:
                try:
                    self.engine.store_prompt(member.session)
                except Exception:  # the new request computes them itself; the member goes on
                    log.exception("storing a decoding request's prompt blocks failed")

    def _release(self, member: Member) -> None:
        """Start the requests held for `member`'s blocks (stored now, or never to be)."""
        for held in [h for h in self.held if h.computing is member]:
            self.held.remove(held)
            try:
                self.add(held.request, held.emit)
            except Exception as exc:  # its restore failed: only this request fails
                log.exception("restoring a held request failed")
                self._end(held.emit, exc)

    def _start(self, request: GenerationRequest, emit: Callable[[object], None], tokens: np.ndarray) -> None:
        session = self.engine.begin(request)
        remaining = len(request.prompt_tokens) - 1 - session.restored.reuse
        self.prefilling.append(Member(session, emit, tokens,
                                      self._text_stream(request, session.usage),
                                      self.engine.prefill_chunks(session), remaining))

    def _text_stream(self, request: GenerationRequest, usage: Usage) -> TextStream:
        return TextStream(self.engine.tokenizer, request, usage,
                          lambda: self.engine.store.count("requests_cancelled"))

    def step(self) -> None:
        """Prefill chunks of the waiting requests, oldest first, up to one chunk's worth of
        tokens (so short remainders join together), then one decode step for all.

        A failure is the error of the requests whose computation raised: a prefill's (or
        first token's) of that request alone, a decode step's of every request decoding
        (their batched state is lost); nothing of theirs is stored, the others go on."""
        self._drop_cancelled()
        budget, spent = self.engine.prefill_step_size, 0
        while self.prefilling:
            member = self.prefilling[0]
            if spent and min(member.remaining, budget) > budget - spent:
                break
            try:
                spent += self._prefill_step(member)
            except Exception as exc:
                log.exception("prefilling a batched request failed")
                self._fail_prefill(member, exc)
                spent += 1
        if self.decoding:
            try:
                self._decode_step()
            except Exception as exc:
                log.exception("a batched decode step failed")
                self._fail_decoding(exc)
        else:
            self._last_step = None

    def _fail_prefill(self, member: Member, exc: Exception) -> None:
        if member in self.prefilling:  # else it failed on its first token, already out
            self.prefilling.remove(member)
        self._release(member)  # who waited for its blocks computes them itself
        self._end(member.emit, exc)

    def _fail_decoding(self, exc: Exception) -> None:
        """The generator may be half-way through the step: drop it with its members."""
        for member in self.decoding.values():
            self._end(member.emit, exc)
        self.decoding.clear()
        self._restart_generator()

    def fail(self, exc: BaseException) -> None:
        """Anything else in a step raised: every member gets the error; the batch starts
        over empty."""
        members: list[Member | Held] = [*self.prefilling, *self.decoding.values(), *self.held]
        for member in members:
            self._end(member.emit, exc)
        self.held.clear()
        self.prefilling.clear()
        self.decoding.clear()
        self._restart_generator()

    def _end(self, emit: Callable[[object], None], last: object) -> None:
        """A request's last items: its last chunk or its error, then the end of its stream."""
        emit(last)
        emit(self.done)

    def _restart_generator(self) -> None:
        self.close()
        self.generator, self._last_step = self._new_generator(), None

    def close(self) -> None:
        self.generator.close()

    # -- prefill -----------------------------------------------------------------------
    def _prefill_step(self, member: Member) -> int:
        """One chunk of `member`'s prefill (or its first token when none is left): the
        tokens computed."""
        computed = 0
        if member.remaining > 0:
            started = time.perf_counter()
            computed = next(member.chunks)
            member.remaining -= computed
            self.stats.prefill_tokens += computed
            self.stats.prefill_seconds += time.perf_counter() - started
        if member.remaining <= 0:
            self.prefilling.popleft()
            self._first_token(member)
            mx.clear_cache()  # the prefill's buffers freed, once its first token is out (10-15 ms at 16K)
        return max(computed, 1)  # the first token is a forward pass too

    def _first_token(self, member: Member) -> None:
        """The last prompt token goes through alone, as on the sequential path; the request
        joins the batch with the token it produced."""
        session, request = member.session, member.session.request
        tokens = request.prompt_tokens
        member.sampler = make_sampler(temp=request.temperature, top_p=request.top_p)
        logits = self.engine.model(mx.array(tokens[-1:])[None], cache=session.prompt_cache)[:, -1, :]
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        y = member.sampler(logprobs)
        if len(tokens) in session.points:
            session.snapshots[len(tokens)] = kvstate.take_snapshot(session.prompt_cache, self.engine.cache_plan)
        token = y.item()
        session.usage.prefill_seconds = time.perf_counter() - session.started
        if any(h.computing is member for h in self.held):
            self.engine.store_prompt(session)
            self._release(member)
        self._emit(member, member.text.feed(token, logprobs))
        if member.text.finish:  # the token was never fed to the cache: it is not stored
            self._finish(member)
            return
        session.fed.append(token)
        (uid,) = self.generator.insert([[token]], max_tokens=[steps_left(request)],
                                       caches=[session.prompt_cache], all_tokens=[list(tokens)],
                                       samplers=[member.sampler])
        self.decoding[uid] = member

    # -- decode ------------------------------------------------------------------------
    def _decode_step(self) -> None:
        started = time.perf_counter()
        if self._last_step is not None:
            self.stats.longest_step_gap = max(self.stats.longest_step_gap, started - self._last_step)
        _, responses = self.generator.next()
        ended: dict[int, Any] = {}
        for response in responses:
            member = self.decoding.get(response.uid)
            if member is None:
                continue
            member.session.fed.append(response.token)  # a returned token is already in the cache
            self._emit(member, member.text.feed(response.token, response.logprobs))
            if response.finish_reason is not None:
                member.text.finish = member.text.finish or "length"
                ended[response.uid] = response.prompt_cache
            elif member.text.finish:
                ended[response.uid] = None
        self._leave(ended)
        now = time.perf_counter()
        self.stats.decode_tokens += len(responses)
        self.stats.decode_seconds += now - started
        self.stats.decode_steps += 1
        self._last_step = now if self.decoding else None

    def _leave(self, ended: dict[int, Any]) -> None:
        """Take ended members out of the generator with their caches, and store them."""
        still_in = [uid for uid, cache in ended.items() if cache is None]
        extracted = self.generator.remove(still_in, return_prompt_caches=True) if still_in else {}
        for uid, cache in ended.items():
            member = self.decoding.pop(uid)
            member.session.prompt_cache = cache if cache is not None else extracted[uid][0]
            self._finish(member)

    def _drop_cancelled(self) -> None:
        for held in [h for h in self.held if h.request.cancelled.is_set()]:
            self.held.remove(held)
            self._end(held.emit, Chunk("", "cancelled", Usage(prompt_tokens=len(held.request.prompt_tokens))))
        for member in [m for m in self.prefilling if m.session.request.cancelled.is_set()]:
            self.prefilling.remove(member)
            self._release(member)
            member.text.cancel()
            member.session.fed.clear()
            self.engine.abandon(member.session)
            self._end(member.emit, member.text.close())
        cancelled = {uid: None for uid, m in self.decoding.items() if m.session.request.cancelled.is_set()}
        for uid in cancelled:
            self.decoding[uid].text.cancel()
        if cancelled:
            self._leave(cancelled)

    def _emit(self, member: Member, chunks: list[Chunk]) -> None:
        for chunk in chunks:
            member.emit(chunk)

    def _finish(self, member: Member) -> None:
        member.emit(member.text.close())
        try:
            self.engine.finish(member.session)
        except Exception as exc:  # the answer is out; only its storing failed
            log.exception("storing a batched request's blocks failed")
            member.emit(exc)
        member.emit(self.done)
