"""A prompt far beyond the context is refused (400 context_length_exceeded) after only a
prefix of it was tokenized: a 32 MB prompt took 28 s and 4.9 GB to tokenize only to be
refused (kvtier/prompt_bound.py). The bound must never refuse what fits."""

from __future__ import annotations

import random

import pytest

from kvtier.prompt_bound import PromptTooLong, check_fits
from tests.conftest import agent_messages, post

MB = 2**20


def prose(chars: int, seed: int = 0) -> str:
    words = " ".join(m["content"] for m in agent_messages()).split()
    rng = random.Random(seed)
    out, size = [], 0
    while size < chars:
        word = rng.choice(words)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)[:chars]


def huge_request(route: str, model: str, text: str) -> dict:
    messages = [{"role": "user", "content": text}]
    return {"/v1/chat/completions": {"model": model, "messages": messages, "max_tokens": 2},
            "/v1/completions": {"model": model, "prompt": text, "max_tokens": 2},
            "/v1/messages": {"model": model, "messages": messages, "max_tokens": 2},
            "/v1/responses": {"model": model, "input": text, "max_output_tokens": 2}}[route]


ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses"]


@pytest.mark.parametrize("route", ROUTES)
def test_a_prompt_of_many_mb_is_refused_before_it_is_tokenized_whole(app_daemon, route):
    text = prose(8 * MB, seed=ROUTES.index(route))  # each its own: a known text is not tokenized again
    tokenized = app_daemon.get("/cache/stats")["tokenizer"]["tokens_tokenized"]
    status, answer, _ = post(app_daemon, route, huge_request(route, str(app_daemon.model), text))
    assert status == 400, answer
    if route == "/v1/messages":
        assert answer["error"]["type"] == "invalid_request_error" and "context" in answer["error"]["message"]
    else:
        assert answer["error"]["code"] == "context_length_exceeded", answer
    # The chat routes' tokenizer counts what it tokenizes: the prompt never reached it.
    assert app_daemon.get("/cache/stats")["tokenizer"]["tokens_tokenized"] == tokenized
    assert app_daemon.get("/health")["status"] == "ok"


@pytest.mark.parametrize("limit", [40, 200, 1000])
def test_the_bound_never_refuses_what_fits_and_never_overcounts(reference, limit):
    """Texts around each limit, prose and runs of one character (many characters per token):
    a refusal's count is at most the whole text's tokens, so what fits is never refused."""
    tokenizer = reference.tokenizer
    texts = [prose(n, seed) for seed, n in enumerate(range(limit, 40 * limit, 3 * limit + 7))]
    texts += [ch * n for ch in " a.\n" for n in (9 * limit, 20 * limit, 60 * limit)]
    refused = 0
    for text in texts:
        whole = len(tokenizer.encode(text, add_special_tokens=False))
        try:
            check_fits(tokenizer, text, limit)
        except PromptTooLong as exc:
            refused += 1
            assert limit < exc.at_least <= whole, (len(text), whole, exc.at_least)
    assert refused  # the long prose is over every limit here: the bound is not idle
