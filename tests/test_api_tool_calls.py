"""Answers that hold a tool call, streamed and not, on the three APIs: what the `openai`
client and OpenAI's schema see, chunk by chunk and event by event, from a generated model
scripted to answer text, a tool call and more text (tests/support/scripted.py), served in
the test process. The sequences are pinned as they are: the routes share one generation
loop, and a change to it shows here."""

from __future__ import annotations

import json

import pytest

from tests import test_api_openai
from tests.conftest import Reference
from tests.support.scripted import make_scripted_model

CALL = '{"name":"read_file","arguments":{"path":"a.py"}}'
SCRIPT = f"Let me look. <tool_call>{CALL}</tool_call> Done"
# The script's tokens as mlx-lm's detokenizer gives them ("\u0020" waits for the next token).
PIECES = ["Let", " me", " look", ".", " ", "<tool_call>", CALL, "</tool_call>", " Done"]
PARAMETERS = {"type": "object", "properties": {"path": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {
    "name": "read_file", "description": "Read a file.", "parameters": PARAMETERS}}]
MESSAGES = [{"role": "user", "content": "Read a.py."}]
validate = test_api_openai.validate  # the OpenAPI schema check, a fixture
ASKED = {"model": "default", "messages": MESSAGES, "tools": TOOLS, "temperature": 0}


@pytest.fixture(scope="module")
def scripted(tmp_path_factory, tiny_model):
    return make_scripted_model(tiny_model, tmp_path_factory.mktemp("scripted") / "model", SCRIPT, (CALL,))


@pytest.fixture(scope="module")
def app(tmp_path_factory, scripted):
    from tests.inprocess import InProcessDaemon

    daemon = InProcessDaemon(scripted, tmp_path_factory.mktemp("chat-tools") / "cache").start()
    yield daemon
    daemon.stop()


def stream(app, body: dict) -> list[dict]:
    """The stream's chunks, checked to end with [DONE]."""
    reply = app.post("/v1/chat/completions", dict(body, stream=True))
    assert reply.status == 200, reply.body[:500]
    events = [line[6:] for line in reply.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


def sequence(chunks: list[dict]) -> list[tuple]:
    """Per choice chunk: its content, its tokens' texts (if logprobs), its finish reason."""
    out = []
    for chunk in chunks:
        if chunk["choices"]:
            choice = chunk["choices"][0]
            logprobs = choice["logprobs"] and [e["token"] for e in choice["logprobs"]["content"]]
            out.append((choice["delta"].get("content"), logprobs, choice["finish_reason"]))
    return out


def read_file_call(call) -> None:
    assert call.id.startswith("call_") and call.type == "function"
    assert (call.function.name, json.loads(call.function.arguments)) == ("read_file", {"path": "a.py"})


def test_the_scripted_model_writes_its_script(scripted):
    reference = Reference(scripted)
    assert reference.chat(MESSAGES, 20) == SCRIPT


def test_a_tool_call_with_text_around_it_not_streamed(app, validate):
    """The call comes out of the text, which is the rest of it (stripped), finish_reason
    "tool_calls"; logprobs are every generated token's, the call's own included."""
    client = app.client()
    whole = client.chat.completions.create(**ASKED, logprobs=True, top_logprobs=2)
    validate(whole.model_dump(mode="json", exclude_unset=True), "CreateChatCompletionResponse")
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look.  Done" and choice.message.role == "assistant"
    assert len(choice.message.tool_calls) == 1
    read_file_call(choice.message.tool_calls[0])
    entries = choice.logprobs.content
    assert [e.token for e in entries] == PIECES and len(entries) == whole.usage.completion_tokens
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token for e in entries)
    assert all(e.logprob == pytest.approx(e.top_logprobs[0].logprob) for e in entries)

    plain = client.chat.completions.create(**ASKED)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == "Let me look.  Done"
    assert plain.choices[0].finish_reason == "tool_calls"


def test_a_streamed_tool_call_with_logprobs_and_usage(app, validate):
    """One chunk per piece the engine gives: text flows until the call's marker, then empty
    deltas still carry their tokens' logprobs; the last choice chunk has the call, the
    text after it (stripped) and finish_reason "tool_calls"; then the usage chunk."""
    whole = app.post("/v1/chat/completions", dict(ASKED, logprobs=True)).json()
    chunks = stream(app, dict(ASKED, logprobs=True, stream_options={"include_usage": True}))
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    assert [c["choices"][0]["delta"].get("role") for c in chunks[:-1]] == ["assistant"] + [None] * 8
    assert sequence(chunks) == [
        ("Let", ["Let"], None), (" me", [" me"], None), (" look", [" look"], None), (".", ["."], None),
        (" ", [" ", "<tool_call>"], None), ("", [CALL], None), ("", ["</tool_call>"], None),
        ("", [" Done"], None), ("Done", [], "tool_calls")]
    calls = chunks[-2]["choices"][0]["delta"]["tool_calls"]
    assert [(c["index"], c["type"], c["function"]) for c in calls] == [
        (0, "function", {"name": "read_file", "arguments": '{"path": "a.py"}'})]
    assert calls[0]["id"].startswith("call_")
    streamed = [e for c in chunks if c["choices"] for e in c["choices"][0]["logprobs"]["content"]]
    assert streamed == whole["choices"][0]["logprobs"]["content"]
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(PIECES)
    assert usage["usage"]["prompt_tokens"] == whole["usage"]["prompt_tokens"]
    assert usage["id"] == chunks[0]["id"]


def test_the_openai_client_reads_a_streamed_tool_call(app):
    chunks = list(app.client().chat.completions.create(**ASKED, stream=True,
                                                      stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "Let me look. Done"
    calls = [call for d in deltas for call in d.tool_calls or []]
    assert len(calls) == 1 and calls[0].index == 0
    read_file_call(calls[0])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage.completion_tokens == len(PIECES) and all(c.usage is None for c in chunks[:-1])
    assert all(c.choices[0].logprobs is None for c in chunks if c.choices)


def test_a_call_cut_by_max_tokens_stays_text(app):
    """Cut right after the marker: nothing to parse, so the held-back text comes out at the
    end and the answer stops for its length."""
    whole = app.post("/v1/chat/completions", dict(ASKED, max_tokens=6)).json()["choices"][0]
    assert whole["message"] == {"role": "assistant", "content": "Let me look. <tool_call>", "refusal": None}
    assert whole["finish_reason"] == "length"
    assert sequence(stream(app, dict(ASKED, max_tokens=6))) == [
        ("Let", None, None), (" me", None, None), (" look", None, None), (".", None, None),
        (" ", None, None), ("<tool_call>", None, "length")]


@pytest.mark.parametrize("offered", [{"tool_choice": "none"}, {"tools": None}], ids=["tool_choice none", "no tools"])
def test_without_tools_to_call_the_markup_is_text(app, offered):
    body = {k: v for k, v in dict(ASKED, **offered).items() if v is not None}
    whole = app.post("/v1/chat/completions", body).json()["choices"][0]
    assert whole["message"] == {"role": "assistant", "content": SCRIPT, "refusal": None}
    assert whole["finish_reason"] == "stop"
    assert sequence(stream(app, body)) == [
        ("Let", None, None), (" me", None, None), (" look", None, None), (".", None, None),
        (" <tool_call>", None, None), (CALL, None, None), ("</tool_call>", None, None),
        (" Done", None, None), ("", None, "stop")]


# -- the Anthropic Messages and Responses APIs, on the same generation ----------------------
# Greedy everywhere (these APIs sample at temperature 1 by default): the script, every time.
ANTHROPIC = {"model": "default", "messages": MESSAGES, "max_tokens": 100, "temperature": 0, "tools": [
    {"name": "read_file", "input_schema": PARAMETERS}]}
RESPONSES = {"model": "default", "input": "Read a.py.", "top_logprobs": 1, "temperature": 0,
             "include": ["message.output_text.logprobs"], "tools": [
    {"type": "function", "name": "read_file", "parameters": PARAMETERS}]}


def events(app, path: str, body: dict) -> list[tuple[str, dict]]:
    reply = app.post(path, dict(body, stream=True))
    assert reply.status == 200, reply.body[:500]
    out = []
    for frame in reply.text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def anthropic_sequence(sent: list[tuple[str, dict]]) -> list[tuple]:
    out: list[tuple] = []
    for kind, data in sent:
        delta = data.get("delta", {})
        shown = (delta.get("text") or delta.get("partial_json") or delta.get("stop_reason")
                 or data.get("content_block", {}).get("type"))
        out.append((kind, shown) if shown else (kind,))
    return out


@pytest.mark.parametrize("cut", [False, True], ids=["whole", "cut by max_tokens"])
def test_anthropic_tool_use_streamed_and_not(app, cut):
    body = dict(ANTHROPIC, max_tokens=6) if cut else ANTHROPIC
    whole = app.post("/v1/messages", body).json()
    if cut:
        assert whole["content"] == [{"type": "text", "text": "Let me look. <tool_call>"}]
        assert whole["stop_reason"] == "max_tokens"
    else:
        text, call = whole["content"]
        assert text == {"type": "text", "text": "Let me look. Done"} and whole["stop_reason"] == "tool_use"
        assert (call["type"], call["name"], call["input"]) == ("tool_use", "read_file", {"path": "a.py"})
    pieces = ["Let", " me", " look", ".", " "] + (["<tool_call>"] if cut else ["Done"])
    tail = [] if cut else [("content_block_start", "tool_use"),
                           ("content_block_delta", '{"path": "a.py"}'), ("content_block_stop",)]
    assert anthropic_sequence(events(app, "/v1/messages", body)) == [
        ("message_start",), ("ping",), ("content_block_start", "text"),
        *[("content_block_delta", piece) for piece in pieces], ("content_block_stop",), *tail,
        ("message_delta", "max_tokens" if cut else "tool_use"), ("message_stop",)]


def responses_sequence(sent: list[tuple[str, dict]]) -> list[tuple]:
    out: list[tuple] = []
    for kind, data in sent:
        if kind == "response.output_text.delta":
            out.append((kind, data["delta"], [e["token"] for e in data["logprobs"]]))
        elif kind == "response.output_item.added":
            out.append((kind, data["item"]["type"]))
        elif kind in ("response.output_text.done", "response.function_call_arguments.done"):
            out.append((kind, data.get("text") or data["arguments"]))
        else:
            out.append((kind,))
    return out


@pytest.mark.parametrize("cut", [False, True], ids=["whole", "cut by max_output_tokens"])
def test_responses_function_call_streamed_and_not(app, cut):
    """A message's logprobs are those of the tokens shown with its text, held-back ones
    with the text they come with; what the buffer held from the call on is dropped when a
    call is parsed (" Done" after it included)."""
    body = dict(RESPONSES, max_output_tokens=6) if cut else RESPONSES
    whole = app.post("/v1/responses", body).json()
    text = "Let me look. <tool_call>" if cut else "Let me look. Done"
    message = whole["output"][0]["content"][0]
    assert message["text"] == text and whole["status"] == ("incomplete" if cut else "completed")
    assert [e["token"] for e in message["logprobs"]] == PIECES[:6]
    if not cut:
        call = whole["output"][1]
        assert (call["type"], call["name"], call["arguments"]) == ("function_call", "read_file", '{"path": "a.py"}')
    last: list[tuple] = ([("response.output_text.delta", "<tool_call>", [])] if cut else
            [("response.output_text.delta", "Done", [])])
    calls = [] if cut else [
        ("response.output_item.added", "function_call"), ("response.function_call_arguments.delta",),
        ("response.function_call_arguments.done", '{"path": "a.py"}'), ("response.output_item.done",)]
    assert responses_sequence(events(app, "/v1/responses", body)) == [
        ("response.created",), ("response.in_progress",), ("response.output_item.added", "message"),
        ("response.content_part.added",),
        *[("response.output_text.delta", piece, [piece]) for piece in ["Let", " me", " look", "."]],
        ("response.output_text.delta", " ", [" ", "<tool_call>"]), *last,
        ("response.output_text.done", text), ("response.content_part.done",), ("response.output_item.done",),
        *calls, ("response.incomplete",) if cut else ("response.completed",)]


# -- the legacy completions, on the same generation as chat ----------------------------------
def test_legacy_completions_stream_echo_then_pieces_then_usage(app):
    """No tool calls here: the markup is text. The prompt is echoed once, with the first
    piece; the usage chunk (no choices) follows the last one."""
    body = {"model": "default", "prompt": "Read a.py.\n", "max_tokens": 20, "temperature": 0, "echo": True,
            "stream": True, "stream_options": {"include_usage": True}}
    reply = app.post("/v1/completions", body)
    chunks = [json.loads(line[6:]) for line in reply.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert [(c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in chunks[:-1]] == [
        ("Read a.py.\nLet", None), (" me", None), (" look", None), (".", None), (" <tool_call>", None),
        (CALL, None), ("</tool_call>", None), (" Done", None), ("", "stop")]
    assert list(chunks[-1]) == ["id", "object", "created", "model", "system_fingerprint", "choices", "usage"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["object"] == "text_completion"
    assert chunks[-1]["usage"]["completion_tokens"] == len(PIECES)


def test_chat_chunks_keep_their_fields_order(app):
    chunks = stream(app, dict(ASKED, stream_options={"include_usage": True}))
    fields = ["id", "created", "model", "system_fingerprint", "object", "choices"]
    assert all(list(c) == fields for c in chunks[:-1]) and list(chunks[-1]) == [*fields, "usage"]
    assert list(chunks[0]["choices"][0]["delta"]) == ["content", "role"]
    assert list(chunks[-2]["choices"][0]["delta"]) == ["content", "tool_calls"]
