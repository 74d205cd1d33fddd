"""The context limit: enforced only where the model's own config declares one, or where
`--max-context` sets one; a model without a position limit takes any prompt, as mlx-lm does."""

from __future__ import annotations

import json
from pathlib import Path

import anthropic
import openai
import pytest
from anthropic.types import MessageParam
from openai.types.responses.response import IncompleteDetails

from kvtier.engine import declared_context_length
from tests.conftest import MODELS, Reference, agent_messages, error_body, model_variant
from tests.support.testmodels import make_model

MAX_TOKENS = 8


@pytest.mark.parametrize("config, limit", [
    ({"model_type": "llama", "max_position_embeddings": 131072}, 131072),
    ({"model_type": "gpt2", "n_positions": 1024, "n_ctx": 1024}, 1024),
    ({"model_type": "dbrx", "max_seq_len": 32768}, 32768),
    ({"model_type": "kimi_linear", "model_max_length": 1048576}, 1048576),
    ({"model_type": "mistral3", "text_config": {"max_position_embeddings": 131072},
      "vision_config": {"max_position_embeddings": 4096}}, 131072),
    ({"model_type": "mamba2", "hidden_size": 2560}, None),  # no position limit
    ({"model_type": "x", "max_position_embeddings": None, "seq_length": True}, None),
])
def test_declared_context_length_reads_the_keys_real_configs_use(config, limit):
    assert declared_context_length(config) == limit


def test_model_without_a_declared_limit_takes_a_long_prompt_like_mlx_lm(app_factory):
    model = make_model(MODELS / "mamba2", "mamba2")
    # Like real Mamba2 checkpoints; mlx-lm's ModelArgs would fill in 2,056.
    assert "max_position_embeddings" not in json.loads((model / "config.json").read_text())
    reference = Reference(model)
    messages = agent_messages("long", repeat=30)
    assert len(reference.chat_tokens(messages)) > 3000
    daemon = app_factory(model)
    response = daemon.client().chat.completions.create(
        model=str(model), messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    assert response.choices[0].message.content == reference.chat(messages, MAX_TOKENS)


def test_max_context_sets_the_limit_on_every_api(app_factory, llama_model):
    daemon = app_factory(llama_model, "--max-context", "300")  # the model declares 32768
    long, short = agent_messages("limit", repeat=6), [{"role": "user", "content": "Hi."}]
    with pytest.raises(openai.BadRequestError) as err:
        daemon.client().chat.completions.create(model=str(llama_model), messages=long, max_tokens=4)
    assert error_body(err.value)["code"] == "context_length_exceeded" and "300" in error_body(err.value)["message"]
    claude = anthropic.Anthropic(base_url=daemon.url, api_key="unused", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as claude_err:
        claude.messages.create(model=str(llama_model), system=long[0]["content"],
                               messages=[{"role": "user", "content": long[1]["content"]}], max_tokens=4)
    assert "300" in str(claude_err.value)
    with pytest.raises(openai.BadRequestError) as err:
        daemon.client().responses.create(model=str(llama_model), instructions=long[0]["content"],
                                         input=long[1]["content"], max_output_tokens=4)
    assert error_body(err.value)["code"] == "context_length_exceeded" and "300" in error_body(err.value)["message"]
    response = daemon.client().chat.completions.create(model=str(llama_model), messages=short, max_tokens=4)
    assert response.choices[0].finish_reason in ("length", "stop")


SHORT_CONTEXT = 700  # room for an answer past the old 512-token default, decoded in seconds


@pytest.fixture
def short_context_model(tiny_model, tmp_path) -> Path:
    def shorten(config: dict) -> None:
        config["max_position_embeddings"] = SHORT_CONTEXT

    return model_variant(tiny_model, tmp_path / "short", "config.json", shorten)


def test_a_request_without_a_limit_runs_until_the_model_stops_or_the_context_is_full(
        app_factory, short_context_model):
    # No --max-tokens ceiling and no limit in the requests (Codex sends none): no answer is cut
    # at 512 tokens, and each API names the end the answer reached.
    daemon = app_factory(short_context_model, ceiling=None)
    # "Hi." is a prompt the tiny model answers past 700 tokens (greedy) without ending it.
    model = str(short_context_model)
    messages: list[MessageParam] = [{"role": "user", "content": "Hi."}]
    client = daemon.client()

    chat = client.chat.completions.create(model=model, messages=messages, temperature=0)
    full = chat.usage.prompt_tokens + chat.usage.completion_tokens == SHORT_CONTEXT
    assert chat.usage.completion_tokens > 512
    assert chat.choices[0].finish_reason == ("length" if full else "stop")

    completion = client.completions.create(model=model, prompt="Hi.", temperature=0)
    full = completion.usage.prompt_tokens + completion.usage.completion_tokens == SHORT_CONTEXT
    assert completion.usage.completion_tokens > 512
    assert completion.choices[0].finish_reason == ("length" if full else "stop")

    response = client.responses.create(model=model, input="Hi.", temperature=0)
    full = response.usage.input_tokens + response.usage.output_tokens == SHORT_CONTEXT
    assert response.usage.output_tokens > 512
    assert response.status == ("incomplete" if full else "completed")
    assert response.incomplete_details == (IncompleteDetails(reason="max_output_tokens") if full else None)

    # Anthropic's API requires max_tokens; a larger one than the room left is answered up to the context's end.
    claude = anthropic.Anthropic(base_url=daemon.url, api_key="unused", max_retries=0)
    message = claude.messages.create(model=model, messages=messages, max_tokens=4096,
                                     extra_body={"temperature": 0})
    usage = message.usage  # input_tokens: those computed, beside those read from the cache
    assert usage.cache_read_input_tokens is not None
    full = usage.input_tokens + usage.cache_read_input_tokens + usage.output_tokens == SHORT_CONTEXT
    assert usage.output_tokens > 512
    assert message.stop_reason == ("model_context_window_exceeded" if full else "end_turn")


def test_a_limit_that_cuts_the_answer_is_named_on_every_api(app_factory, short_context_model):
    # The operator's --max-tokens caps what a request asks; the request's own limit below it
    # is kept. Either one cutting the answer is "length" / "incomplete" / "max_tokens".
    daemon = app_factory(short_context_model, "--max-tokens", "6", ceiling=None)
    model = str(short_context_model)
    messages: list[MessageParam] = [{"role": "user", "content": "Hi."}]
    client = daemon.client()
    for asked in (None, 4, 100):
        expected = min(asked or 6, 6)
        chat = client.chat.completions.create(model=model, messages=messages, max_tokens=asked, temperature=0)
        assert (chat.usage.completion_tokens, chat.choices[0].finish_reason) == (expected, "length")
        response = client.responses.create(model=model, input="Hi.", max_output_tokens=asked, temperature=0)
        assert (response.usage.output_tokens, response.status) == (expected, "incomplete")
        assert response.incomplete_details == IncompleteDetails(reason="max_output_tokens")
    claude = anthropic.Anthropic(base_url=daemon.url, api_key="unused", max_retries=0)
    message = claude.messages.create(model=model, messages=messages, max_tokens=100, extra_body={"temperature": 0})
    assert (message.usage.output_tokens, message.stop_reason) == (6, "max_tokens")
