"""What today's coding agents send, through a real daemon: any model name, Anthropic requests
as Claude Code sends them (recorded bodies in tests/fixtures/claude_code), disconnects."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import anthropic
import openai
import pytest

MESSAGE = [{"role": "user", "content": "hi"}]


def post(daemon, path: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(daemon.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def anthropic_client(daemon) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=daemon.url, api_key="unused", max_retries=0, timeout=300)


# -- model names ------------------------------------------------------------------------
def test_any_model_name_is_served_and_echoed(shared_daemon):
    reply = anthropic_client(shared_daemon).messages.create(
        model="claude-opus-5-5", messages=MESSAGE, max_tokens=2)
    assert reply.model == "claude-opus-5-5" and reply.usage.output_tokens >= 1
    chat = shared_daemon.client().chat.completions.create(model="gpt-5-codex", messages=MESSAGE,
                                                          max_tokens=2)
    assert chat.model == "gpt-5-codex"
    log = shared_daemon.log.read_text()
    assert log.count("requests for model 'claude-opus-5-5' are served by") == 1
    anthropic_client(shared_daemon).messages.create(model="claude-opus-5-5", messages=MESSAGE,
                                                    max_tokens=1)
    assert shared_daemon.log.read_text().count("model 'claude-opus-5-5' are served by") == 1


def test_strict_names_refuse_others_and_aliases_are_listed(daemon_factory, llama_model):
    daemon = daemon_factory(llama_model, "--strict-model-names", "--model-alias", "house-model",
                            "--model-alias", f"coder={llama_model}")
    models = daemon.client().models.list()
    assert [m.id for m in models.data] == [str(llama_model), "house-model", "coder"]
    for name in ("house-model", "coder", "default", llama_model.name):
        assert daemon.client().chat.completions.create(
            model=name, messages=MESSAGE, max_tokens=1).model == name
    with pytest.raises(openai.NotFoundError) as err:
        daemon.client().chat.completions.create(model="gpt-9", messages=MESSAGE, max_tokens=1)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    with pytest.raises(anthropic.NotFoundError) as err:
        anthropic_client(daemon).messages.create(model="claude-9", messages=MESSAGE, max_tokens=1)
    assert err.value.body["error"]["type"] == "not_found_error"
    assert "claude-9" in err.value.body["error"]["message"]
