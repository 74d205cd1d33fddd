"""The context limit: enforced only where the model's own config declares one, or where
`--max-context` sets one; a model without a position limit takes any prompt, as mlx-lm does."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest

from conftest import MODELS, Reference, agent_messages
from kvtier.engine import declared_context_length
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
    assert err.value.body["code"] == "context_length_exceeded" and "300" in err.value.body["message"]
    claude = anthropic.Anthropic(base_url=daemon.url, api_key="unused", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.create(model=str(llama_model), system=long[0]["content"], messages=long[1:],
                               max_tokens=4)
    assert "300" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        daemon.client().responses.create(model=str(llama_model), instructions=long[0]["content"],
                                         input=long[1]["content"], max_output_tokens=4)
    assert err.value.body["code"] == "context_length_exceeded" and "300" in err.value.body["message"]
    response = daemon.client().chat.completions.create(model=str(llama_model), messages=short, max_tokens=4)
    assert response.choices[0].finish_reason in ("length", "stop")
