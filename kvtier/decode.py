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


def steps_left(request: GenerationRequest) -> int:
    """Decode steps a decoder may take after a request's first token; a request with no
    limit gets a count it never reaches (its TextStream ends it: EOS, a stop string, cancelling)."""
    return sys.maxsize if request.max_tokens is None else request.max_tokens - 1


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

    def close(self) -> None:
        self.rows.clear()
