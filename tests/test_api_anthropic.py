"""The Anthropic Messages API and tool use on both APIs, judged by the real `anthropic` and
`openai` clients and by plain mlx-lm on the same chat-template prompt, on the daemon's app
served in the test process."""

from __future__ import annotations

import json

import anthropic
import pytest

from daemon.routes.anthropic import tool_use_block
from daemon.routes.tools import ToolCallBuffer, split_tool_calls
from kvtier.stops import StopMatcher
from tests.conftest import agent_messages, post

GREEDY = {"temperature": 0}  # this SDK version has no temperature argument
TOOLS = [
    {"name": "read_file", "description": "Read a file from the workspace.",
     "input_schema": {"type": "object", "properties": {"path": {"type": "string"}},
                      "required": ["path"]}},
    {"name": "run_shell", "description": "Run a shell command in the project root.",
     "input_schema": {"type": "object", "properties": {"command": {"type": "string"}},
                      "required": ["command"]}},
]
# The same tools as the chat template sees them (OpenAI / Hugging Face function shape).
TEMPLATE_TOOLS = [{"type": "function", "function": {
    "name": t["name"], "description": t["description"], "parameters": t["input_schema"]}}
    for t in TOOLS]


def system_prompt(project: str) -> str:
    return agent_messages(project=project)[0]["content"]


@pytest.fixture(scope="module")
def client(app_daemon) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=app_daemon.url, api_key="unused", max_retries=0,
                               timeout=300)


@pytest.fixture(scope="module")
def model(app_daemon) -> str:
    return str(app_daemon.model)


def reference_tokens(reference, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    kwargs = {"tools": tools} if tools else {}
    return list(reference.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs))



def sse_events(text: str) -> list[tuple[str, dict]]:
    events = []
    for frame in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def text_of(message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


# -- /v1/messages -----------------------------------------------------------------------
def test_message_equals_mlx_lm_and_second_request_reads_the_cache(client, model, reference):
    system = system_prompt("first-contact")
    question = [{"role": "user", "content": "List the files."}]
    response = client.messages.create(model=model, system=system, messages=question,
                                      max_tokens=12, extra_body=GREEDY)
    expected = [{"role": "system", "content": system}, *question]
    assert text_of(response) == reference.chat(expected, 12)
    assert response.type == "message" and response.role == "assistant" and response.model == model
    assert response.id.startswith("msg_")
    assert response.stop_reason in ("end_turn", "max_tokens") and response.stop_sequence is None
    usage = response.usage
    assert usage.output_tokens <= 12 and usage.cache_creation_input_tokens == 0
    assert usage.input_tokens + usage.cache_read_input_tokens == len(reference.chat_tokens(expected))

    again = client.messages.create(model=model, system=system, max_tokens=12, extra_body=GREEDY,
                                   messages=[{"role": "user", "content": "Show the tests."}])
    assert again.usage.cache_read_input_tokens > 0
    assert again.usage.input_tokens < usage.input_tokens
    expected = [{"role": "system", "content": system}, {"role": "user", "content": "Show the tests."}]
    assert text_of(again) == reference.chat(expected, 12)


def test_system_blocks_with_cache_control_equal_a_string_system(client, model, reference):
    system = system_prompt("blocks")
    messages = [{"role": "user", "content": [{"type": "text", "text": "Read the config.",
                                              "cache_control": {"type": "ephemeral"}}]}]
    response = client.messages.create(
        model=model, max_tokens=10, extra_body=GREEDY, messages=messages,
        system=[{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}])
    expected = [{"role": "system", "content": system}, {"role": "user", "content": "Read the config."}]
    assert text_of(response) == reference.chat(expected, 10)


def test_stream_events_text_and_usage(app_daemon, client, model, reference):
    system = system_prompt("streaming")
    messages = [{"role": "user", "content": "Stream it."}]
    expected = reference.chat([{"role": "system", "content": system}, *messages], 12)
    body = {"model": model, "system": system, "messages": messages, "max_tokens": 12,
            "temperature": 0, "stream": True}
    status, text, headers = post(app_daemon, "/v1/messages", body)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(text)
    names = [name for name, _ in events]
    assert all(name == data["type"] for name, data in events)
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["input_tokens"] > 0
    assert events[2][1]["content_block"] == {"type": "text", "text": ""}
    assert "".join(data["delta"]["text"] for name, data in events if name == "content_block_delta") == expected
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] in ("end_turn", "max_tokens")
    assert set(delta["usage"]) >= {"input_tokens", "output_tokens", "cache_read_input_tokens",
                                   "cache_creation_input_tokens"}

    # The SDK's stream helper assembles the same message; this time the prompt is cached.
    with client.messages.stream(model=model, system=system, messages=messages, max_tokens=12,
                                extra_body=GREEDY) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == text_of(final) == expected
    assert final.usage.cache_read_input_tokens > 0
    whole_prompt = start["usage"]["input_tokens"] + start["usage"]["cache_read_input_tokens"]
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == whole_prompt


def test_stream_start_gives_the_cache_split_the_end_gives(client, model):
    # The prompt is restored before the first event goes out: message_start already says how
    # much of it came from the cache (it used to say 0 and leave the split to message_delta).
    system = system_prompt("stream-start")
    for question in ("First question.", "Second question."):
        with client.messages.stream(model=model, system=system, max_tokens=4, extra_body=GREEDY,
                                    messages=[{"role": "user", "content": question}]) as stream:
            events = list(stream)
            final = stream.get_final_message().usage
        (start,) = [event.message.usage for event in events if event.type == "message_start"]
        (delta,) = [event.usage for event in events if event.type == "message_delta"]
        split = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
        assert [getattr(start, name) for name in split] == [getattr(delta, name) for name in split] \
            == [getattr(final, name) for name in split]
    assert start.cache_read_input_tokens > 0  # the second question shares the system prompt


def test_agent_loop_reuses_the_cache_every_turn(client, model, reference):
    """user -> model text / scripted tool_use -> tool_result -> ... : every turn after the first
    reads the earlier turns from the cache and answers exactly like mlx-lm."""
    system = system_prompt("agent-loop")
    conversation: list[dict] = [{"role": "user", "content": "Read a.py and run it."}]
    template: list[dict] = [{"role": "system", "content": system},
                            {"role": "user", "content": "Read a.py and run it."}]

    prompt_lengths: list[int] = []

    def turn() -> anthropic.types.Message:
        response = client.messages.create(model=model, system=system, tools=TOOLS,
                                          messages=conversation, max_tokens=10, extra_body=GREEDY)
        tokens = reference_tokens(reference, template, TEMPLATE_TOOLS)
        assert text_of(response) == reference.generate(tokens, 10)
        usage = response.usage
        assert usage.input_tokens + usage.cache_read_input_tokens == len(tokens)
        prompt_lengths.append(len(tokens))
        return response

    def scripted_tool_use(ident: str, name: str, arguments: dict, result, text: str = "") -> None:
        content = ([{"type": "text", "text": text}] if text else []) + [
            {"type": "tool_use", "id": ident, "name": name, "input": arguments}]
        conversation.append({"role": "assistant", "content": content})
        conversation.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": ident, "content": result}]})
        template.append({"role": "assistant", "content": text, "tool_calls": [
            {"id": ident, "type": "function", "function": {"name": name, "arguments": arguments}}]})
        result_text = result if isinstance(result, str) else "\n".join(b["text"] for b in result)
        template.append({"role": "tool", "tool_call_id": ident, "content": result_text})

    first = turn()
    # Only the opening words of the system prompt can be cached (other tests share them).
    assert first.usage.cache_read_input_tokens is not None
    assert first.usage.cache_read_input_tokens < first.usage.input_tokens

    scripted_tool_use("toolu_01", "read_file", {"path": "a.py"}, "print('hello')\n")
    second = turn()

    answer = text_of(second)
    conversation += [{"role": "assistant", "content": answer},
                     {"role": "user", "content": "Now run it."}]
    template += [{"role": "assistant", "content": answer}, {"role": "user", "content": "Now run it."}]
    third = turn()

    scripted_tool_use("toolu_02", "run_shell", {"command": "python a.py"},
                      [{"type": "text", "text": "hello"}, {"type": "text", "text": "exit 0"}],
                      text="Running it.")
    fourth = turn()

    for previous_prompt, response in zip(prompt_lengths, (second, third, fourth)):
        # The whole previous prompt (and more) came from the cache; only the new turn is computed.
        cached = response.usage.cache_read_input_tokens
        assert cached is not None and cached >= previous_prompt
        assert response.usage.input_tokens < first.usage.input_tokens


def test_prefill_continues_the_final_assistant_turn(client, model, reference):
    system = system_prompt("prefill")
    messages = [{"role": "user", "content": "Name a file."},
                {"role": "assistant", "content": "The file is"}]
    response = client.messages.create(model=model, system=system, messages=messages,
                                      max_tokens=8, extra_body=GREEDY)
    tokens = reference.chat_tokens([{"role": "system", "content": system}, messages[0]])
    tokens += list(reference.tokenizer.encode("The file is", add_special_tokens=False))
    assert text_of(response) == reference.generate(tokens, 8)


def test_count_tokens_equals_the_prompt_length(client, model, reference):
    system = system_prompt("counting")
    messages = [{"role": "user", "content": "How long is this?"}]
    count = client.messages.count_tokens(model=model, system=system, messages=messages)
    expected = [{"role": "system", "content": system}, *messages]
    assert count.input_tokens == len(reference.chat_tokens(expected))
    with_tools = client.messages.count_tokens(model=model, system=system, messages=messages,
                                              tools=TOOLS)
    assert with_tools.input_tokens == len(reference_tokens(reference, expected, TEMPLATE_TOOLS))
    assert with_tools.input_tokens > count.input_tokens


def test_stop_sequences_and_max_tokens(app_daemon, client, model, reference):
    system = system_prompt("stopping")
    messages = [{"role": "user", "content": "Say something."}]
    full = reference.chat([{"role": "system", "content": system}, *messages], 20)
    stop = full[5:8]
    response = client.messages.create(model=model, system=system, messages=messages,
                                      max_tokens=20, extra_body=GREEDY,
                                      stop_sequences=["never-generated-xyz", stop])
    assert text_of(response) == full[: full.index(stop)]
    assert response.stop_reason == "stop_sequence" and response.stop_sequence == stop

    body = {"model": model, "system": system, "messages": messages, "max_tokens": 20,
            "temperature": 0, "stream": True, "stop_sequences": [stop]}
    events = sse_events(post(app_daemon, "/v1/messages", body)[1])
    streamed = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert streamed == full[: full.index(stop)]
    assert events[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": stop}

    short = client.messages.create(model=model, system=system, messages=messages, max_tokens=3,
                                   extra_body=GREEDY)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 3


MESSAGE = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body,status,kind,words", [
    ({"messages": MESSAGE, "max_tokens": 5}, 400, "invalid_request_error", "model"),
    ({"model": "MODEL", "messages": MESSAGE}, 400, "invalid_request_error", "max_tokens"),
    ({"model": "MODEL", "messages": MESSAGE, "max_tokens": 0}, 400, "invalid_request_error", "max_tokens"),
    ({"model": "MODEL", "messages": MESSAGE, "max_tokens": "5"}, 400, "invalid_request_error", "max_tokens"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "word " * 40_000}], "max_tokens": 5},
     400, "invalid_request_error", "prompt is too long"),
    ({"model": "MODEL", "max_tokens": 5}, 400, "invalid_request_error", "messages"),
    ({"model": "MODEL", "messages": [], "max_tokens": 5}, 400, "invalid_request_error", "messages"),
    ({"model": "MODEL", "messages": [{"role": "tool", "content": "x"}], "max_tokens": 5},
     400, "invalid_request_error", "messages.0.role"),
    ({"model": "MODEL", "messages": [{"role": "user"}], "max_tokens": 5}, 400, "invalid_request_error", "content"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}]}],
      "max_tokens": 5}, 400, "invalid_request_error", "image"),
    ({"model": "MODEL", "messages": MESSAGE, "max_tokens": 5, "temperature": 1.5},
     400, "invalid_request_error", "temperature"),
    ({"model": "MODEL", "messages": MESSAGE, "max_tokens": 5, "stop_sequences": "END"},
     400, "invalid_request_error", "stop_sequences"),
    ({"model": "MODEL", "messages": MESSAGE, "max_tokens": 5, "system": 7}, 400, "invalid_request_error", "system"),
    ({"model": "MODEL", "messages": MESSAGE, "max_tokens": 5, "tools": [{"name": "x"}]},
     400, "invalid_request_error", "input_schema"),
    ({"model": "MODEL", "messages": MESSAGE, "max_tokens": 5, "tool_choice": {"type": "maybe"}},
     400, "invalid_request_error", "tool_choice"),
    ({"model": "MODEL", "messages": MESSAGE, "max_tokens": 5, "tool_choice": {"type": "tool", "name": "nope"},
      "tools": [{"name": "read_file", "input_schema": {"type": "object"}}]},
     400, "invalid_request_error", "no tool named 'nope'"),
    ({"model": "MODEL", "messages": MESSAGE, "max_tokens": 5, "tool_choice": {"type": "any"}},
     400, "invalid_request_error", "'any' needs 'tools'"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": [
        {"type": "tool_result", "content": "x"}]}], "max_tokens": 5}, 400, "invalid_request_error", "tool_use_id"),
])
def test_bad_requests_get_anthropic_errors(app_daemon, body, status, kind, words):
    body = {k: (str(app_daemon.model) if v == "MODEL" else v) for k, v in body.items()}
    code, response, _ = post(app_daemon, "/v1/messages", body)
    assert code == status
    assert response["type"] == "error" and set(response["error"]) == {"type", "message"}
    assert response["error"]["type"] == kind and words in response["error"]["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b""])
def test_malformed_bodies_get_anthropic_errors(app_daemon, raw):
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        code, response, _ = post(app_daemon, path, None, raw=raw)
        assert code == 400 and response["error"]["type"] == "invalid_request_error"


def test_sdk_raises_typed_errors(client, model):
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model=model, messages=MESSAGE, max_tokens=5, extra_body={"temperature": 3})


# -- tool calls out of generated text -----------------------------------------------------
CALL_TEXT = ('Let me look.\n<tool_call>\n{"name": "read_file", "arguments": {"path": "a.py"}}\n'
             '</tool_call>')


def test_tool_call_parsing_with_the_real_tokenizer(reference):
    tokenizer = reference.tokenizer  # mlx_lm.load of the generated model: json_tools parser
    assert tokenizer.has_tool_calling and tokenizer.tool_call_start == "<tool_call>"
    text, calls = split_tool_calls(CALL_TEXT, tokenizer, TEMPLATE_TOOLS)
    assert text == "Let me look."
    assert [(c.name, c.arguments) for c in calls] == [("read_file", {"path": "a.py"})]
    openai_call = calls[0].openai()
    assert openai_call["type"] == "function" and openai_call["id"]
    assert openai_call["function"] == {"name": "read_file", "arguments": '{"path": "a.py"}'}
    block = tool_use_block(calls[0])
    assert block["type"] == "tool_use" and block["id"].startswith("toolu_")
    assert (block["name"], block["input"]) == ("read_file", {"path": "a.py"})

    # Two calls, text between them kept; an unreadable (cut-off) call stays text.
    two = CALL_TEXT + '\n<tool_call>\n{"name": "run_shell", "arguments": {"command": "ls"}}\n</tool_call>'
    text, calls = split_tool_calls(two, tokenizer)
    assert text == "Let me look." and [c.name for c in calls] == ["read_file", "run_shell"]
    cut = 'Hi <tool_call>\n{"name": "read_fi'
    assert split_tool_calls(cut, tokenizer) == (cut, [])
    assert split_tool_calls("no calls here", tokenizer) == ("no calls here", [])

    # Streaming: text before the call flows, the call is held back and parsed at the end,
    # however the text is cut into pieces (the marker may arrive split).
    for size in (1, 3, 7, len(CALL_TEXT)):
        buffer = ToolCallBuffer(tokenizer, TEMPLATE_TOOLS)
        shown = "".join(buffer.feed(CALL_TEXT[i:i + size]) for i in range(0, len(CALL_TEXT), size))
        tail, calls = buffer.finish()
        assert shown == "Let me look.\n" and tail == ""
        assert [(c.name, c.arguments) for c in calls] == [("read_file", {"path": "a.py"})]
    disabled = ToolCallBuffer(tokenizer, None, enabled=False)
    assert disabled.feed(CALL_TEXT) == CALL_TEXT and disabled.finish() == ("", [])


def test_stop_matcher_names_the_earliest_stop():
    stops = StopMatcher(["END", "xy"])
    out = [stops.feed(piece) for piece in ("abc x", "yz E")]
    assert out == [("abc", False), (" ", True)] and stops.matched == "xy"


# -- OpenAI side: tools through the chat template -----------------------------------------
def test_openai_tools_are_rendered_and_tool_turns_equal_mlx_lm(app_daemon, model, reference):
    client = app_daemon.client()
    system = system_prompt("openai-tools")
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Read a.py."}]
    plain = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    with_tools = client.chat.completions.create(model=model, messages=messages, tools=TEMPLATE_TOOLS,
                                                max_tokens=8, temperature=0)
    tokens = reference_tokens(reference, messages, TEMPLATE_TOOLS)
    assert with_tools.usage.prompt_tokens == len(tokens) > plain.usage.prompt_tokens
    assert with_tools.choices[0].message.content == reference.generate(tokens, 8)

    # An assistant tool call (arguments as OpenAI's JSON string) and its result, next turn.
    call = {"id": "call_1", "type": "function",
            "function": {"name": "read_file", "arguments": '{"path": "a.py"}'}}
    follow = messages + [{"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": "call_1", "content": "print('hi')"}]
    response = client.chat.completions.create(model=model, messages=follow, tools=TEMPLATE_TOOLS,
                                              max_tokens=8, temperature=0)
    expected: list[dict] = messages + [
        {"role": "assistant", "content": "", "tool_calls": [dict(call, function={
            "name": "read_file", "arguments": {"path": "a.py"}})]},
        {"role": "tool", "tool_call_id": "call_1", "content": "print('hi')"}]
    tokens = reference_tokens(reference, expected, TEMPLATE_TOOLS)
    assert response.usage.prompt_tokens == len(tokens)
    assert response.usage.prompt_tokens_details.cached_tokens > 0
    assert response.choices[0].message.content == reference.generate(tokens, 8)
    assert response.choices[0].finish_reason in ("stop", "length")

    stream = client.chat.completions.create(model=model, messages=follow, tools=TEMPLATE_TOOLS,
                                            max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
        response.choices[0].message.content


def test_openai_rejects_malformed_tools(app_daemon, model):
    code, response, _ = post(app_daemon, "/v1/chat/completions", {
        "model": model, "messages": MESSAGE, "tools": [{"type": "function"}]})
    assert code == 400 and response["error"]["param"] == "tools[0].function"
    code, response, _ = post(app_daemon, "/v1/chat/completions", {
        "model": model, "max_tokens": 2, "messages": MESSAGE + [
            {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                "name": "f", "arguments": "{not json"}}]}]})
    assert code == 400 and response["error"]["param"] == "messages[1].tool_calls[0].function.arguments"


def test_claude_code_style_request(app_daemon):
    """Fields an agent like Claude Code sends (query string, beta headers, metadata, thinking,
    cache_control everywhere, echoed thinking blocks) are accepted; `model` may be "default"."""
    body = {
        "model": "default", "max_tokens": 6, "stream": True, "temperature": 1,
        "metadata": {"user_id": "someone"}, "thinking": {"type": "enabled", "budget_tokens": 1024},
        "system": [{"type": "text", "text": "You are a coding agent."},
                   {"type": "text", "text": system_prompt("claude-code"),
                    "cache_control": {"type": "ephemeral"}}],
        "tools": [dict(TOOLS[0], cache_control={"type": "ephemeral"})],
        "tool_choice": {"type": "auto"},
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "<system-reminder>ok</system-reminder>"},
                                         {"type": "text", "text": "Read a.py",
                                          "cache_control": {"type": "ephemeral"}}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "I should read it.", "signature": "x"},
                {"type": "tool_use", "id": "toolu_9", "name": "read_file", "input": {"path": "a.py"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9",
                                          "content": "x = 1", "is_error": False,
                                          "cache_control": {"type": "ephemeral"}}]},
        ],
    }
    reply = app_daemon.post("/v1/messages?beta=true", body, headers={
        "x-api-key": "anything", "anthropic-version": "2023-06-01",
        "anthropic-beta": "prompt-caching-2024-07-31"})
    assert reply.status == 200, reply.body[:500]
    events = sse_events(reply.text)
    assert events[0][0] == "message_start" and events[-1][0] == "message_stop"
    assert events[-2][1]["usage"]["output_tokens"] <= 6
