"""The scheduler: every request the daemon serves goes through it, on the MLX thread.

One step (`Scheduler.step`), top to bottom:
1. admit (`add`): `Engine.begin` restores the request's cached prefix (`TieredStore.restore`:
   RAM, then SSD, then the shared store; snapshots) into its own prompt cache. Blocks of it
   that a member is computing are waited for; those a decoding member has computed are
   stored by it first.
2. prefill: the remainder, one chunk per step (`Engine.prefill_chunks`), so the streams
   already decoding get a token between chunks.
3. join (`_join`): requests prefilled in this step that will decode beside others join the
   batch with their prompt's last token as input, so the batch's next pass gives their first
   tokens, all in one pass (as mlx_lm.server's). With `join_rests`, a request whose
   uncomputed rest fits one chunk joins with that rest instead: the batch's pass computes the
   rests of all that join together (one pass, not one each). One that will decode alone, or
   whose prompt's end needs a snapshot (recurrent layers) or whose blocks others wait for,
   takes its first token in a pass of its own (`decode.first_token`, read before anything
   more is queued: its time to first token is one pass), then joins with it.
4. decode: one step of every decoding request: batched, `decode.Decoders` (a lone request
   on its own one-row pass; two or more in mlx-lm's `BatchGenerator`, their caches merged,
   `BatchKVCache.merge`; attention per row, kvtier.row_attention), or interleaved, a
   `RowDecoder` (each request's own one-row pass, in turn).
5. leave: a request that ended (length, EOS, stop string, cancel) leaves with its cache
   (`remove(..., return_prompt_caches=True)`) and `Engine.finish` stores its new blocks
   (`TieredStore.keep`); the others stay.

A batch of one is a batch: `--max-batch 1`, seeded sampling (it runs as the only member, on
its own row, so its random stream is the process's one) and `generate` (a scheduler of one on the calling
thread, for tests, bench and `warm`) run the same code.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator, cast

import mlx.core as mx
import numpy as np
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import make_sampler

from . import kvstate
from .blocks import common_prefix
from .decode import Decoders, RowDecoder, first_token, steps_left, tokens_left
from .engine import Engine, Session
from .requests import Chunk, GenerationRequest, Usage
from .text import TextStream

log = logging.getLogger("kvtier.scheduler")


def runs_alone(request: GenerationRequest) -> bool:
    """Seeded sampling: its random stream must be the process's one, so nothing runs beside it."""
    return request.seed is not None and request.temperature > 0


# -- the batch ---------------------------------------------------------------------------
@dataclass(eq=False)  # one request: found in the queues by identity
class Member:
    session: Session
    emit: Callable[[object], None]
    prompt: np.ndarray  # its prompt's tokens, compared with those of requests arriving
    text: TextStream
    chunks: Any  # the prefill's chunk iterator
    remaining: int  # prompt tokens still to prefill (the last one is decoded)
    sampler: Callable
    joined: float | None = None  # when it joined the decoder with its first token still to come

    def feed(self, token: int, logprobs: Any) -> None:
        """A token it generated: its text (if any) goes out; the first one times its TTFT."""
        if self.joined is not None:
            self.first_arrived(self.joined)
        for chunk in self.text.feed(token, logprobs):
            self.emit(chunk)

    def first_arrived(self, began: float) -> None:
        """Time to first token, and the first token's own step, in the request's usage."""
        now, usage = time.perf_counter(), self.session.usage
        usage.prefill_seconds, usage.steps["first_token"] = now - self.session.started, now - began
        self.joined = None


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


def insert_prompt_ends(generator: Decoders | RowDecoder, members: list[Member]) -> dict[int, Member]:
    """Members into the decoder with the end of their prompt their cache does not hold (its
    last token, or the rest `join_rests` left to the batch) as input: its passes compute it
    and give their first tokens. By the decoder's ids."""
    began, requests = time.perf_counter(), [m.session.request for m in members]
    held = [len(r.prompt_tokens) - 1 - m.remaining for r, m in zip(requests, members)]
    uids = generator.insert([r.prompt_tokens[n:] for r, n in zip(requests, held)],
                            max_tokens=[tokens_left(r) for r in requests],
                            caches=[m.session.prompt_cache for m in members],
                            all_tokens=[list(r.prompt_tokens[:n]) for r, n in zip(requests, held)],
                            samplers=[m.sampler for m in members])
    for member in members:
        member.joined = began
    return dict(zip(uids, members))


# How a scheduler decodes its requests (`/health` batching.mode): the one choice, named once.
BATCHED = "batched"  # one forward pass of all rows per decode step
INTERLEAVED = "interleaved"  # each request's own one-row pass, in turn: a lone request's arithmetic
ONE_AT_A_TIME = "one at a time"  # a scheduler of one (--max-batch 1): its own row too


class Scheduler:
    """The requests the MLX thread is serving at once; `step` advances them all a little.

    `mode`: BATCHED shares one forward pass between the decoding requests (Decoders: a request
    decoding alone has its own row); otherwise each request decodes its own row (RowDecoder).
    `join_rests` (BATCHED only): short prompt rests are computed in the batch's pass, beside
    each other and the decoding rows (mlx-lm's batched prefill): for backends where batched
    decode already differs from decoding alone (the load's probe measures this path too), so
    no exactness is lost."""

    def __init__(self, engine: Engine, max_size: int, done: object, mode: str = BATCHED, join_rests: bool = False):
        self.engine, self.max_size, self.done = engine, max_size, done
        self.mode = mode
        self.interleaved = mode != BATCHED
        self.join_rests = join_rests and not self.interleaved
        self.generator = self._new_generator(self.interleaved)
        self.prefilling: deque[Member] = deque()
        self.decoding: dict[int, Member] = {}
        self.held: list[Held] = []
        self.stats = BatchStats()
        self._last_step: float | None = None

    def _new_generator(self, rows: bool) -> Decoders | RowDecoder:
        if rows:
            return RowDecoder(self.engine.model)
        batch = BatchGenerator(self.engine.model, stop_tokens=[], completion_batch_size=self.max_size,
                               prefill_batch_size=self.max_size, prefill_step_size=self.engine.prefill_step_size)
        return Decoders(RowDecoder(self.engine.model), batch)

    def __len__(self) -> int:
        return len(self.prefilling) + len(self.decoding) + len(self.held)

    @property
    def idle(self) -> bool:
        return not len(self)

    @property
    def full(self) -> bool:
        return len(self) >= self.max_size

    @property
    def alone(self) -> bool:
        """A member must run alone (seeded sampling): admit nothing beside it."""
        members = [*self.prefilling, *self.decoding.values()]
        return any(runs_alone(m.session.request) for m in members)

    def add(self, request: GenerationRequest, emit: Callable[[object], None]) -> None:
        """Restore the request's cached prefix now; its prefill runs over the next steps. If a
        member is computing blocks this prompt starts with, wait for them instead; if one
        decoding has computed them, it stores them first."""
        tokens = np.asarray(request.prompt_tokens)
        if not self.engine.reusable:  # nothing is stored: nothing to wait for or share
            self._start(request, emit, tokens)
            return
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
        text = TextStream(self.engine.tokenizer, request, session.usage,
                          lambda: self.engine.store.count("requests_cancelled"))
        self.prefilling.append(Member(session, emit, tokens, text, self.engine.prefill_chunks(session), remaining,
                                      make_sampler(temp=request.temperature, top_p=request.top_p)))

    def step(self) -> None:
        """Prefill chunks of the waiting requests, oldest first, up to one chunk's worth of
        time (so short remainders join together), then one decode step for all.

        A failure is the error of the requests whose computation raised: a prefill's (or
        first token's) of that request alone, a decode step's of every request decoding
        (their batched state is lost); nothing of theirs is stored, the others go on."""
        self._drop_cancelled()
        spent = 0.0  # of one step's prefill time (chunking.PrefillChunk.share)
        ready: list[Member] = []  # prefilled this step: they join the decoder together
        while self.prefilling:
            member = self.prefilling[0]
            share = self.engine.chunk_share(member.session, len(member.prompt) - 1 - member.remaining)
            if spent and spent + share > 1.0:
                break
            spent += share
            if self._rest_joins_batch(member):  # computed in the batch's pass, if it joins one
                ready.append(self.prefilling.popleft())
                continue
            try:
                if self._prefill_step(member):
                    ready.append(member)
            except Exception as exc:
                log.exception("prefilling a batched request failed")
                self._fail_prefill(member, exc)
        if ready:
            self._join(ready)
        if self.decoding:
            try:
                self._decode_step()
            except Exception as exc:
                log.exception("a batched decode step failed")
                self._fail_decoding(exc)
        else:
            self._last_step = None

    def advance(self) -> None:
        """`step`, with anything it raised beyond one request's failure ending every member
        (`fail`): the daemon's loop and `generate` both run the scheduler this way."""
        try:
            self.step()
        except Exception as exc:
            log.exception("a scheduler step on the MLX thread failed")
            self.fail(exc)

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
        self.generator, self._last_step = self._new_generator(self.interleaved), None

    def close(self) -> None:
        self.generator.close()

    # -- prefill ---------------------------------------------------------------------
    def _prefill_step(self, member: Member) -> bool:
        """One chunk of `member`'s prefill; True when its prompt but the last token is computed
        (it leaves the prefill queue to join the decoder)."""
        if member.remaining > 0:
            self._prefill_chunk(member)
        if member.remaining > 0:
            return False
        self.prefilling.popleft()
        mx.clear_cache()  # the prefill's buffers freed (10-15 ms at 16K)
        return True

    def _prefill_chunk(self, member: Member) -> None:
        started = time.perf_counter()
        computed = next(member.chunks)
        member.remaining -= computed
        self.stats.prefill_tokens += computed
        self.stats.prefill_seconds += time.perf_counter() - started

    def _rest_joins_batch(self, member: Member) -> bool:
        """`join_rests`: the member's uncomputed rest fits one chunk and completes no block
        (requests restore full blocks: none waits for one only the batch's copy holds), with
        no snapshot in it: the batch's pass can compute it, if the member joins a batch."""
        if not self.join_rests or member.remaining <= 0 or runs_alone(member.session.request):
            return False
        end, size = len(member.prompt) - 1, self.engine.block_size
        position = end - member.remaining
        return (self.engine.chunk_end(member.session, position) == end and position // size == (end + 1) // size
                and not self._ends_prompt_alone(member))

    def _join(self, ready: list[Member]) -> None:
        """The prefilled requests join the decoder. Those that will decode beside others join
        the batch with their last prompt token as their input: the batch's pass over it gives
        their first token, one pass for all of them (joining costs no pass of its own). A
        request that will decode alone, or whose prompt's end needs a snapshot or whose blocks
        another waits for, takes its first token alone first (`_first_token_alone`)."""
        batched = [m for m in ready if not self._ends_prompt_alone(m)] if not self.interleaved else []
        if len(batched) < 2 and not self.decoding:  # it decodes alone: its first token read at once
            batched = []
        for member in (m for m in ready if m not in batched):
            try:
                while member.remaining > 0:  # a rest left for a batch it does not join after all
                    self._prefill_chunk(member)
                self._first_token_alone(member)
            except Exception as exc:
                log.exception("a first token failed")
                self._fail_prefill(member, exc)
        if batched:
            self.decoding.update(insert_prompt_ends(self.generator, batched))

    def _ends_prompt_alone(self, member: Member) -> bool:
        """Its prompt's end needs a snapshot (recurrent layers: taken from its own cache), or
        requests wait for its blocks (stored from a cache that holds the whole prompt)."""
        session = member.session
        return len(session.request.prompt_tokens) in session.points or self._waited_on(member)

    def _waited_on(self, member: Member) -> bool:
        return any(h.computing is member for h in self.held)

    def _first_token_alone(self, member: Member) -> None:
        """The last prompt token goes through alone; the request joins the decoder with the
        token it produced."""
        session, request = member.session, member.session.request
        tokens = request.prompt_tokens
        if runs_alone(request):
            mx.random.seed(request.seed)  # right before its first sample, alone in the process
        began = time.perf_counter()
        token, logprobs = first_token(self.engine.model, tokens, session.prompt_cache, member.sampler)
        if len(tokens) in session.points:
            session.snapshots[len(tokens)] = kvstate.take_snapshot(session.prompt_cache, self.engine.cache_plan)
        member.first_arrived(began)
        if self._waited_on(member):
            self.engine.store_prompt(session)
            self._release(member)
        member.feed(token, logprobs)
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
            if getattr(response, "in_cache", True):  # mlx-lm's batch feeds every token it returns
                member.session.fed.append(response.token)
            member.feed(response.token, response.logprobs)
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

    def _finish(self, member: Member) -> None:
        member.emit(member.text.close())
        try:
            self.engine.finish(member.session)
        except Exception as exc:  # the answer is out; only its storing failed
            log.exception("storing a batched request's blocks failed")
            member.emit(exc)
        member.emit(self.done)


# -- a scheduler of one, on the calling thread ----------------------------------------------
def generate(engine: Engine, request: GenerationRequest) -> Iterator[Chunk]:
    """One request through a scheduler of its own, run on the calling thread (which must be
    the one that owns MLX): the daemon's path, for `warm`, tests and bench. Closing the
    iterator early cancels the request."""
    done, items = object(), deque[object]()
    scheduler = Scheduler(engine, 1, done, mode=ONE_AT_A_TIME)
    scheduler.add(request, items.append)
    try:
        while True:
            while items:
                item = items.popleft()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield cast(Chunk, item)
            scheduler.advance()
    finally:
        if not scheduler.idle:  # left early: it ends as a cancelled request does
            request.cancelled.set()
            scheduler.advance()
        scheduler.close()




def warm(engine: Engine, messages: list[dict], tools: list[dict] | None = None, pin: bool = False,
         progress: Callable[[int, int], None] | None = None) -> dict:
    """Prefill a prompt (an agent's system prompt and tools, say) and persist it."""
    tokens, boundaries = engine.renderer.render(messages, tools)
    request = GenerationRequest(tokens, max_tokens=1, temperature=0.0, progress=progress, boundaries=boundaries)
    usage = list(generate(engine, request))[-1].usage
    assert usage is not None  # the last chunk carries it
    engine.store.flush()
    pinned = engine.pin(tokens) if pin else 0
    return {"tokens": len(tokens), "computed_tokens": usage.computed_tokens, "pinned_entries": pinned}
