"""The arithmetic of a decode step, and the decoder that runs each request's row alone.

`step` is the one place a forward pass becomes a token: logits -> log-probabilities
(logits - logsumexp) -> the request's sampler. The first token of every request, each step
of `RowDecoder` and the exactness probe's lone decode all go through it, so they compute the
same numbers plain mlx-lm computes for one request.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

import mlx.core as mx

from .requests import GenerationRequest

Sampler = Callable[[mx.array], mx.array]


def step(model: Any, tokens: mx.array, prompt_cache: list[Any], sampler: Sampler) -> tuple[mx.array, mx.array]:
    """One forward pass of one row over `tokens` (1-D), queued, not evaluated: the sampled
    next token and the log-probabilities it was sampled from (shape (1, vocabulary))."""
    logits = model(tokens[None], cache=prompt_cache)[:, -1, :]
    logprobs = logits - mx.logsumexp(logits, keepdims=True)
    return sampler(logprobs), logprobs


def first_token(model: Any, prompt: list[int], prompt_cache: list[Any], sampler: Sampler) -> tuple[int, mx.array]:
    """The prompt's last token through a cache holding the rest: the first generated token
    and its log-probabilities."""
    y, logprobs = step(model, mx.array(prompt[-1:]), prompt_cache, sampler)
    return int(y.item()), logprobs


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def tokens_left(request: GenerationRequest) -> int:
    """Tokens a decoder may return for a request, its first included; a request with no limit
    gets a count it never reaches (its TextStream ends it: EOS, a stop string, cancelling)."""
    return sys.maxsize if request.max_tokens is None else request.max_tokens


def steps_left(request: GenerationRequest) -> int:
    """The same, after a first token computed outside the decoder."""
    return tokens_left(request) - 1


@dataclass
class RowResponse:
    """What `RowDecoder.next` returns per request: the fields of mlx-lm's batch responses
    that the scheduler reads."""

    uid: int
    token: int
    logprobs: mx.array  # of the step that produced `token`
    finish_reason: str | None
    prompt_cache: list[Any] | None
    in_cache: bool = True  # False for a row's last token: no pass runs past an answer's end


@dataclass(eq=False)
class _Row:
    prompt_cache: list[Any]
    sampler: Sampler
    left: int  # tokens it may still return
    y: mx.array  # its next token, computed (or queued) but not yet returned
    logprobs: mx.array | None = None  # the log-probabilities y was sampled from


class RowDecoder:
    """BatchGenerator's `insert` / `next` / `remove` where requests must not share a forward
    pass (`--exact` on a backend whose batched decode is not bit-identical, `--max-batch 1`,
    seeded sampling, caches mlx-lm cannot merge): each request decodes alone over its own
    prompt cache, one forward pass of one row per step, plain mlx-lm's arithmetic. The
    requests take turns token by token, so none waits for another to finish.

    A request's next token is queued before its last one is read (compute overlaps the host
    side), so a returned token is already in its cache; but for its last (max_tokens), whose
    step nobody would read."""

    def __init__(self, model: Any):
        self.model = model
        self.rows: dict[int, _Row] = {}
        self._next_uid = 0

    def __len__(self) -> int:
        return len(self.rows)

    def _step(self, row: _Row, token: mx.array) -> None:
        row.y, row.logprobs = step(self.model, token, row.prompt_cache, row.sampler)

    def insert(self, tokens: list[list[int]], max_tokens: list[int], caches: list[list[Any]],
               samplers: list[Sampler], **_: Any) -> list[int]:
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
        going_on = [row for row in self.rows.values() if row.left > 1]
        for row in going_on:
            self._step(row, row.y)
        mx.async_eval([(row.y, row.logprobs) for row in going_on])
        responses = []
        for uid, (y, logprobs) in ready.items():
            row = self.rows[uid]
            row.left -= 1
            done = row.left <= 0
            responses.append(RowResponse(uid, y.item(), logprobs, "length" if done else None,
                                         row.prompt_cache if done else None, in_cache=not done))
            if done:
                del self.rows[uid]
        return None, responses

    def remove(self, uids: list[int], return_prompt_caches: bool = False) -> dict[int, tuple]:
        removed = {uid: (self.rows.pop(uid).prompt_cache,) for uid in uids}
        return removed if return_prompt_caches else {}

    def take(self, uid: int) -> _Row:
        """Take a row out with its next token (computed, not returned, not yet in its cache)."""
        return self.rows.pop(uid)

    def close(self) -> None:
        self.rows.clear()


class Decoders:
    """The batched mode's decoder, with RowDecoder's surface: a request decoding alone runs
    on a RowDecoder (plain mlx-lm's speed and numbers); when a second one joins, the lone row
    moves into the BatchGenerator with it and the batch decodes them together. A batch down
    to one row keeps it until it ends (moving it back would re-split its cache for a few
    tokens; a request decoding alone after that is again a row)."""

    def __init__(self, rows: RowDecoder, batch: Any):
        self.rows, self.batch = rows, batch
        self._where: dict[int, tuple[Any, int]] = {}  # our uid -> (its decoder, its uid there)
        self._ours: dict[tuple[int, int], int] = {}  # (id of the decoder, its uid there) -> ours
        self._moved: list[RowResponse] = []  # a moved row's token, returned by the next `next`
        self._next_uid = 0

    def __len__(self) -> int:
        return len(self._where)

    def insert(self, tokens: list[list[int]], max_tokens: list[int], caches: list[list[Any]],
               samplers: list[Sampler], all_tokens: list[list[int]]) -> list[int]:
        if len(tokens) == 1 and not self._where:
            return self._track(self.rows, self.rows.insert(tokens, max_tokens, caches, samplers))
        for uid in [uid for uid, (decoder, _) in self._where.items() if decoder is self.rows]:
            self._move_to_batch(uid)
        return self._track(self.batch, self.batch.insert(tokens, max_tokens=max_tokens, caches=caches,
                                                         all_tokens=all_tokens, samplers=samplers))

    def _move_to_batch(self, uid: int) -> None:
        """The row's pending token is returned once (next `next`), then fed by the batch as a
        new request's first token is. A row whose pending token is its last stays."""
        _, row_uid = self._where[uid]
        if self.rows.rows[row_uid].left <= 1:
            return
        row = self.rows.take(row_uid)
        token = int(row.y.item())
        self._moved.append(RowResponse(uid, token, row.logprobs, None, None))
        del self._ours[(id(self.rows), row_uid)]
        (batch_uid,) = self.batch.insert([[token]], max_tokens=[row.left - 1], caches=[row.prompt_cache],
                                         samplers=[row.sampler])
        self._where[uid] = (self.batch, batch_uid)
        self._ours[(id(self.batch), batch_uid)] = uid

    def _track(self, decoder: Any, uids: list[int]) -> list[int]:
        ours = []
        for uid in uids:
            self._where[self._next_uid] = (decoder, uid)
            self._ours[(id(decoder), uid)] = self._next_uid
            ours.append(self._next_uid)
            self._next_uid += 1
        return ours

    def next(self) -> tuple[None, list[RowResponse]]:
        """One token of every request, whichever decoder it is on."""
        responses, self._moved = self._moved, []
        for decoder in (self.rows, self.batch):
            if any(d is decoder for d, _ in self._where.values()):
                responses += [self._as_ours(decoder, r) for r in decoder.next()[1]]
        return None, responses

    def _as_ours(self, decoder: Any, response: Any) -> RowResponse:
        uid = self._ours[(id(decoder), response.uid)]
        if response.finish_reason is not None:
            self._forget(uid)
        return RowResponse(uid, response.token, response.logprobs, response.finish_reason,
                           response.prompt_cache, getattr(response, "in_cache", True))

    def _forget(self, uid: int) -> tuple[Any, int]:
        decoder, inner = self._where.pop(uid)
        del self._ours[(id(decoder), inner)]
        return decoder, inner

    def remove(self, uids: list[int], return_prompt_caches: bool = False) -> dict[int, tuple]:
        removed = {}
        for uid in uids:
            decoder, inner = self._forget(uid)
            caches = decoder.remove([inner], return_prompt_caches=return_prompt_caches)
            if return_prompt_caches:
                removed[uid] = caches[inner]
        return removed

    def close(self) -> None:
        self.rows.close()
        self.batch.close()
