"""What today's coding agents send: any model name, Anthropic requests as Claude Code sends
them (recorded bodies in tests/fixtures/claude_code), on the daemon's app served in the test
process; and clients that leave mid-stream, through a `kvtier serve` subprocess and its log."""

from __future__ import annotations

import json
import logging
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from anthropic.types import MessageParam

from tests.conftest import error_body, model_variant

MESSAGE: list[MessageParam] = [{"role": "user", "content": "hi"}]  # as both APIs take it


def post(daemon, path: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    reply = daemon.post(path, body, headers=headers)
    return reply.status, reply.json()


def anthropic_client(daemon) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=daemon.url, api_key="unused", max_retries=0, timeout=300)


# -- model names ------------------------------------------------------------------------
def test_any_model_name_is_served_and_echoed(app_daemon, caplog):
    caplog.set_level(logging.INFO, logger="kvtier.models")
    reply = anthropic_client(app_daemon).messages.create(
        model="claude-opus-5-5", messages=MESSAGE, max_tokens=2)
    assert reply.model == "claude-opus-5-5" and reply.usage.output_tokens >= 1
    chat = app_daemon.client().chat.completions.create(model="gpt-5-codex", messages=MESSAGE,
                                                       max_tokens=2)
    assert chat.model == "gpt-5-codex"
    assert caplog.text.count("requests for model 'claude-opus-5-5' are served by") == 1
    anthropic_client(app_daemon).messages.create(model="claude-opus-5-5", messages=MESSAGE,
                                                 max_tokens=1)
    assert caplog.text.count("model 'claude-opus-5-5' are served by") == 1  # said once


def test_strict_names_refuse_others_and_aliases_are_listed(app_factory, llama_model):
    daemon = app_factory(llama_model, "--strict-model-names", "--model-alias", "house-model",
                            "--model-alias", f"coder={llama_model}")
    models = daemon.client().models.list()
    assert [m.id for m in models.data] == [str(llama_model), "house-model", "coder"]
    for name in ("house-model", "coder", "default", llama_model.name):
        assert daemon.client().chat.completions.create(
            model=name, messages=MESSAGE, max_tokens=1).model == name
    with pytest.raises(openai.NotFoundError) as err:
        daemon.client().chat.completions.create(model="gpt-9", messages=MESSAGE, max_tokens=1)
    assert error_body(err.value)["code"] == "model_not_found" and error_body(err.value)["param"] == "model"
    with pytest.raises(anthropic.NotFoundError) as claude_err:
        anthropic_client(daemon).messages.create(model="claude-9", messages=MESSAGE, max_tokens=1)
    assert error_body(claude_err.value)["error"]["type"] == "not_found_error"
    assert "claude-9" in error_body(claude_err.value)["error"]["message"]


# -- Anthropic Messages as Claude Code sends it ------------------------------------------
FIXTURES = Path(__file__).parent / "fixtures" / "claude_code"
QWEN_SYSTEM_CHECK = ("{%- for m in messages %}{% if m.role == 'system' and not loop.first %}"
                     "{{ raise_exception('System message must be at the beginning.') }}"
                     "{% endif %}{% endfor %}")


def recorded(name: str) -> tuple[dict, dict]:
    """A request body Claude Code sent (and its headers), recorded from a real run; its prose
    (system prompt, tool descriptions, reminders) is replaced with synthetic words."""
    data = json.loads((FIXTURES / f"{name}.json").read_text())
    return data["body"], data["headers"]


@pytest.fixture(scope="module")
def first_system_only_model(llama_model, tmp_path_factory) -> Path:
    """The test model with a chat template that, like Qwen's, refuses a system message
    anywhere but first (same weights, linked)."""
    def check_system_first(config: dict) -> None:
        config["chat_template"] = QWEN_SYSTEM_CHECK + config["chat_template"]

    return model_variant(llama_model, tmp_path_factory.mktemp("qwen-style") / "model", "tokenizer_config.json",
                         check_system_first)


# A system message mid-conversation: beyond what the SDK's types allow, as agents send it.
MID_SYSTEM: dict[str, Any] = {"system": "You are a coding agent.", "messages": [
    {"role": "user", "content": "List the files."},
    {"role": "system", "content": [{"type": "text", "text": "# Environment\nDirectory: /work"}]}]}


def test_mid_conversation_system_message_is_rendered_where_it_stands(app_daemon, reference):
    reply = anthropic_client(app_daemon).messages.create(
        model="claude-opus-5-5", max_tokens=10, extra_body={"temperature": 0}, **MID_SYSTEM)
    expected = reference.chat([{"role": "system", "content": "You are a coding agent."},
                               {"role": "user", "content": "List the files."},
                               {"role": "system", "content": "# Environment\nDirectory: /work"}], 10)
    assert reply.content[0].text == expected


def test_mid_conversation_system_message_is_folded_when_the_template_refuses_it(
        app_factory, first_system_only_model, reference):
    daemon = app_factory(first_system_only_model)
    reply = anthropic_client(daemon).messages.create(
        model="claude-opus-5-5", max_tokens=10, extra_body={"temperature": 0}, **MID_SYSTEM)
    expected = reference.chat([{"role": "system", "content": "You are a coding agent."},
                               {"role": "user", "content": "List the files.\n\n# Environment\n"
                                                           "Directory: /work"}], 10)
    assert reply.content[0].text == expected


def test_unknown_role_is_refused_in_anthropic_shape(app_daemon):
    status, body = post(app_daemon, "/v1/messages", {
        "model": "m", "max_tokens": 2, "messages": [{"role": "wizard", "content": "hi"}]})
    assert status == 400 and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert "messages.0.role" in body["error"]["message"]


def test_recorded_claude_code_request_is_accepted_as_sent(app_daemon):
    """Every field and beta header of a real Claude Code request (thinking, context_management,
    output_config, metadata, cache_control, a system message inside messages)."""
    body, headers = recorded("first_conversation")
    status, counted = post(app_daemon, "/v1/messages/count_tokens", body, headers)
    assert status == 200 and counted["input_tokens"] > 5000


# -- the billing line -------------------------------------------------------------------
def ask_recorded(daemon, name: str) -> dict:
    body, headers = recorded(name)
    status, reply = post(daemon, "/v1/messages", dict(body, max_tokens=2, stream=False), headers)
    assert status == 200, reply
    return reply["usage"]


def test_new_claude_code_conversation_reuses_the_system_prompt_and_tools(app_factory, tiny_model):
    """Two recorded conversations differ in the billing line (cc_version=…1c9 / …34c), the
    question, and what follows it: all before the question comes from the cache."""
    daemon = app_factory(tiny_model)
    first = ask_recorded(daemon, "first_conversation")
    second = ask_recorded(daemon, "second_conversation")
    assert first["cache_read_input_tokens"] == 0
    prompt = second["kvtier"]["prompt_tokens"]
    assert second["cache_read_input_tokens"] > 0.75 * prompt


def billing_request(version: str) -> dict:
    system = [{"type": "text", "text": f"x-anthropic-billing-header: cc_version=2.1.332.{version}; "
                                       "cc_entrypoint=sdk-cli; cch=00000;"},
              {"type": "text", "text": "You are a careful coding agent. " * 40,
               "cache_control": {"type": "ephemeral"}}]
    return {"model": "claude-opus-5-5", "max_tokens": 2, "system": system, "messages": MESSAGE}


@pytest.mark.parametrize("flags,reused", [((), True), (("--keep-billing-header",), False)])
def test_billing_line_is_dropped_unless_kept(app_factory, tiny_model, flags, reused):
    daemon = app_factory(tiny_model, *flags)
    post(daemon, "/v1/messages", billing_request("1c9"))
    status, reply = post(daemon, "/v1/messages", billing_request("34c"))
    assert status == 200
    cached, prompt = reply["usage"]["cache_read_input_tokens"], reply["usage"]["kvtier"]["prompt_tokens"]
    # Kept, only the line's own first words match ("…billing-header: cc_version=2.1.332.").
    assert (cached == prompt - 1) if reused else (cached < prompt / 10)


# -- clients that leave mid-stream ------------------------------------------------------
def read_then_hang_up(daemon, path: str, body: dict, nbytes: int = 400) -> bytes:
    """What `curl -N … | head -c 400` does: read the start of a stream, close the socket."""
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=120) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        received = b""
        while len(received) < nbytes:
            received += sock.recv(nbytes)
    return received


def test_a_client_leaving_mid_stream_is_an_info_line_and_a_counter(daemon_factory, tiny_model):
    daemon = daemon_factory(tiny_model, ceiling=None)  # the answers outlast the clients
    long_answer = {"model": "m", "stream": True, "messages": MESSAGE, "temperature": 1}
    assert b" 200 OK" in read_then_hang_up(daemon, "/v1/messages", dict(long_answer, max_tokens=30000))
    assert b" 200 OK" in read_then_hang_up(daemon, "/v1/chat/completions",
                                           dict(long_answer, max_tokens=20000))
    assert b" 200 OK" in read_then_hang_up(daemon, "/v1/responses", {
        "model": "m", "stream": True, "input": "hi", "max_output_tokens": 20000}, nbytes=3000)
    deadline = time.time() + 120
    while daemon.get("/cache/stats")["counters"].get("client_disconnects", 0) < 3:
        assert time.time() < deadline, daemon.log.read_text()[-3000:]
        time.sleep(0.2)
    log = daemon.log.read_text()
    assert "Traceback" not in log and " ERROR " not in log
    assert log.count("client went away during POST") == 3
    # A handler aiohttp cancels when its client leaves logs no access line; one whose write
    # failed first logs the 200 it sent. Never a 500.
    access = [line for line in log.splitlines() if '"POST /v1/' in line]
    assert all('HTTP/1.1" 200' in line for line in access)
    metrics = urllib.request.urlopen(daemon.url + "/metrics").read().decode()
    assert f'kvtier_client_disconnects_total{{model="{daemon.model}"}} 3' in metrics
    # The MLX thread is free again: the next request is answered.
    assert anthropic_client(daemon).messages.create(model="m", messages=MESSAGE, max_tokens=2).content
