"""Batched mode, a request decoding alone (issue 33): it runs on its own one-row pass, so its
numbers are plain mlx-lm's bit for bit; a second request joining moves it into the batch
mid-answer with every token emitted exactly once, and either may be cancelled there."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import MODELS, Reference, agent_messages
from tests.support.testmodels import make_model

MAX_TOKENS = 12
FIRST, SECOND = (agent_messages("lone", question=q, repeat=2) for q in ("List the files.", "Why do the tests fail?"))


@pytest.fixture(scope="module")
def wide_model():
    """hidden 512: under OpenBLAS mlx-lm's batched pass is not bit-identical to a lone one."""
    return make_model(MODELS / "llama", "llama")  # llama's default size: 512 x 8


@pytest.fixture
def scheduler(wide_model, tmp_path):
    from kvtier.config import CacheConfig
    from kvtier.engine import Engine
    from kvtier.scheduler import BATCHED, Scheduler

    engine = Engine(str(wide_model), CacheConfig(cache_dir=tmp_path, block_size=64), prefill_step_size=64)
    try:
        yield Scheduler(engine, max_size=4, done=object(), mode=BATCHED)
    finally:
        engine.close()


def _add(scheduler: Any, messages: list[dict], max_tokens: int = MAX_TOKENS) -> tuple[Any, list]:
    from kvtier.requests import GenerationRequest

    request = GenerationRequest(scheduler.engine.renderer.chat_tokens(messages), max_tokens, temperature=0.0,
                                logprobs=3)
    out: list = []
    scheduler.add(request, out.append)
    return request, out


def _entries(out: list) -> list:
    return [e for item in out if hasattr(item, "logprobs") for e in item.logprobs]


def _text(out: list) -> str:
    return "".join(item.text for item in out if hasattr(item, "text"))


def _until(scheduler: Any, done: Any) -> None:
    steps = 0
    while not done():
        scheduler.step()
        steps += 1
        assert steps < 500


def _same_as_mlx_lm(entries: list, expected: list[tuple[int, list[float]]], exactly: bool) -> None:
    assert len(entries) == len(expected)
    for entry, (token, row) in zip(entries, expected):
        likeliest = sorted(range(len(row)), key=lambda i: -row[i])[:3]
        got, want = [entry.logprob, *(v for _, v in entry.top)], [row[token], *(row[i] for i in likeliest)]
        assert got == (want if exactly else pytest.approx(want, abs=1e-4))


def test_a_lone_request_in_batched_mode_has_mlx_lm_s_logprobs_bit_for_bit(scheduler, wide_model):
    reference = Reference(wide_model)
    _, out = _add(scheduler, FIRST)
    _until(scheduler, lambda: scheduler.idle)
    expected = reference.logprobs(reference.chat_tokens(FIRST), MAX_TOKENS)
    entries = _entries(out)
    assert len(entries) == out[-2].usage.completion_tokens == MAX_TOKENS
    assert _text(out) == reference.chat(FIRST, MAX_TOKENS)
    _same_as_mlx_lm(entries, expected, exactly=True)


@pytest.mark.parametrize("first_max, join_after", [(MAX_TOKENS, 4), (2, 1)], ids=["mid_answer", "at_its_last_token"])
def test_a_lone_request_joined_mid_answer_moves_into_the_batch(scheduler, wide_model, first_max, join_after):
    """Its tokens before the join are plain mlx-lm's bit for bit (its own row); after, both
    answers are their greedy texts alone, each token emitted once. A row whose next token is
    its last stays on its own row."""
    reference = Reference(wide_model)
    _, first = _add(scheduler, FIRST, first_max)
    _until(scheduler, lambda: len(_entries(first)) >= join_after)
    before = len(_entries(first))
    stats = scheduler.stats
    tokens, steps = stats.decode_tokens, stats.decode_steps
    _, second = _add(scheduler, SECOND)
    _until(scheduler, lambda: scheduler.idle)
    for out, messages, n in ((first, FIRST, first_max), (second, SECOND, MAX_TOKENS)):
        assert out[-1] is scheduler.done and out[-2].finish_reason == "length"
        assert _text(out) == reference.chat(messages, n)
        assert len(_entries(out)) == out[-2].usage.completion_tokens == n
    expected = reference.logprobs(reference.chat_tokens(FIRST), first_max)
    _same_as_mlx_lm(_entries(first)[:before], expected[:before], exactly=True)
    _same_as_mlx_lm(_entries(first), expected, exactly=False)
    if first_max > join_after + 1:
        assert stats.decode_tokens - tokens > stats.decode_steps - steps, "they never shared a step"


@pytest.mark.parametrize("cancelled", ["first", "second"])
def test_either_request_may_be_cancelled_once_joined(scheduler, wide_model, cancelled):
    reference = Reference(wide_model)
    first_request, first = _add(scheduler, FIRST)
    _until(scheduler, lambda: len(_entries(first)) >= 3)
    second_request, second = _add(scheduler, SECOND)
    _until(scheduler, lambda: len(_entries(second)) >= 3)
    (first_request if cancelled == "first" else second_request).cancelled.set()
    _until(scheduler, lambda: scheduler.idle)
    gone, kept, kept_messages = (first, second, SECOND) if cancelled == "first" else (second, first, FIRST)
    assert gone[-1] is scheduler.done and gone[-2].finish_reason == "cancelled"
    assert kept[-1] is scheduler.done and kept[-2].finish_reason == "length"
    assert _text(kept) == reference.chat(kept_messages, MAX_TOKENS)
    assert len(_entries(kept)) == kept[-2].usage.completion_tokens == MAX_TOKENS
    # The scheduler goes on: a request alone afterwards is plain mlx-lm's again.
    _, again = _add(scheduler, SECOND)
    _until(scheduler, lambda: scheduler.idle)
    _same_as_mlx_lm(_entries(again), reference.logprobs(reference.chat_tokens(SECOND), MAX_TOKENS), exactly=True)
