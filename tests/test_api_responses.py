"""OpenAI's Responses API (POST /v1/responses), driven by the real `openai` client's
`responses` API, validated against OpenAI's own schemas, and equal to plain mlx-lm, on the
daemon's app served in the test process."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from openai.types.responses import ResponseFunctionToolCall

from daemon.bodies import validate as validate_body
from daemon.bodies_responses import ResponsesRequest
from daemon.routes.responses import Answer, parse_tools
from daemon.routes.tools import split_tool_calls
from kvtier.requests import GenerationRequest, Usage
from tests.conftest import agent_messages, error_body, openai_spec
from tests.test_api_openai import _assert_logprobs_of_mlx_lm, _entries, _null_to_type

SYSTEM = agent_messages(project="responses")[0]["content"]
TOOLS = [{"type": "function", "name": "read_file", "description": "Read a file.",
          "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                         "required": ["path"]}}]
TEMPLATE_TOOLS = [{"type": "function", "function": {
    "name": "read_file", "description": "Read a file.", "parameters": TOOLS[0]["parameters"]}}]


@pytest.fixture(scope="module")
def validate():
    spec = openai_spec()
    if spec is None:
        pytest.skip("OpenAI spec (shared/specs/openai-openapi.json) not found")
    components = _null_to_type(json.loads(spec.read_text())["components"])
    schemas = components["schemas"]
    # Each stream event by its own schema (ResponseStreamEvent's anyOf hides which one failed).
    events = {schemas[name]["properties"]["type"]["enum"][0]: name for name in (
        ref["$ref"].split("/")[-1] for ref in schemas["ResponseStreamEvent"]["anyOf"])}

    def check(instance: dict, schema_name: str) -> None:
        if schema_name == "ResponseStreamEvent":
            schema_name = events[instance["type"]]
        schema = {"$ref": f"#/components/schemas/{schema_name}", "components": components}
        jsonschema.Draft202012Validator(schema).validate(instance)

    return check


@pytest.fixture(scope="module")
def client(app_daemon) -> openai.OpenAI:
    return app_daemon.client()


def post(daemon, body: dict) -> tuple[int, Any]:  # the JSON answer, or a stream's text
    reply = daemon.post("/v1/responses", body)
    return reply.status, reply.content


def sse(text: str) -> list[dict]:
    events = []
    for frame in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.splitlines())
        event = json.loads(lines["data"])
        assert lines["event"] == event["type"]
        events.append(event)
    return events


def test_text_input_equals_mlx_lm_matches_the_schema_and_reuses_the_cache(app_daemon, client,
                                                                          validate, reference):
    body = {"model": "gpt-5-codex", "instructions": SYSTEM, "input": "List the files.",
            "max_output_tokens": 10, "temperature": 0}
    status, raw = post(app_daemon, body)
    assert status == 200
    validate(raw, "Response")
    expected = reference.chat([{"role": "system", "content": SYSTEM},
                               {"role": "user", "content": "List the files."}], 10)
    assert raw["output"][0]["content"][0]["text"] == expected and raw["model"] == "gpt-5-codex"
    response = client.responses.create(model="gpt-5-codex", instructions=SYSTEM, temperature=0,
                                       input="Show the tests.", max_output_tokens=10)
    assert response.output_text == reference.chat([{"role": "system", "content": SYSTEM},
                                                   {"role": "user", "content": "Show the tests."}], 10)
    details = response.usage.input_tokens_details
    assert details.cached_tokens > 0.5 * response.usage.input_tokens
    assert details.cached_tokens + details.cache_write_tokens == response.usage.input_tokens
    assert response.status in ("completed", "incomplete")


def test_stream_events_match_the_schema_and_equal_the_non_streamed_text(app_daemon, client,
                                                                        validate, reference):
    body = {"model": "m", "instructions": SYSTEM, "input": "Stream it.", "max_output_tokens": 8,
            "temperature": 0, "stream": True}
    status, text = post(app_daemon, body)
    assert status == 200
    events = sse(text)
    for event in events:
        validate(event, "ResponseStreamEvent")
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-1] == "response.incomplete"  # 8 tokens were not enough to finish
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    streamed = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    expected = reference.chat([{"role": "system", "content": SYSTEM},
                               {"role": "user", "content": "Stream it."}], 8)
    assert streamed == expected
    final = events[-1]["response"]
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["usage"]["output_tokens"] == 8 and final["output"][0]["content"][0]["text"] == expected
    with client.responses.stream(model="m", instructions=SYSTEM, input="Stream it.",
                                 max_output_tokens=8, temperature=0) as stream:
        sdk_events = list(stream)
    deltas = [e.delta for e in sdk_events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == expected
    # The SDK's get_final_response() wants response.completed; an answer cut off by
    # max_output_tokens ends with response.incomplete, as with OpenAI.
    assert sdk_events[-1].type == "response.incomplete" and sdk_events[-1].response.output_text == expected


def test_output_logprobs_when_included_streamed_or_not(client, validate, reference):
    """`include: ["message.output_text.logprobs"]` with `top_logprobs`: the output text's
    entry per token, plain mlx-lm's numbers, in the schema; the stream's deltas carry the same
    entries, and its done events the whole list (they were always empty). Without `include`
    the lists stay empty, as on OpenAI's API."""
    asked = dict(model="m", instructions=SYSTEM, input="Which tests fail?", max_output_tokens=6,
                 temperature=0, top_logprobs=2, include=["message.output_text.logprobs"])
    whole = client.responses.create(**asked)
    validate(whole.model_dump(mode="json", exclude_unset=True), "Response")
    part = whole.output[0].content[0]
    assert len(part.logprobs) == whole.usage.output_tokens and whole.top_logprobs == 2
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Which tests fail?"}]
    entries = _entries(part.logprobs)
    _assert_logprobs_of_mlx_lm(entries, 2, reference, reference.chat_tokens(messages))

    with client.responses.stream(**asked) as stream:
        events = list(stream)
    for event in events:
        validate(event.model_dump(mode="json", exclude_unset=True), "ResponseStreamEvent")
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert _entries([entry for e in deltas for entry in e.logprobs]) == entries
    done = next(e for e in events if e.type == "response.output_text.done")
    assert _entries(done.logprobs) == entries
    assert _entries(events[-1].response.output[0].content[0].logprobs) == entries

    plain = client.responses.create(**dict(asked, include=None))
    assert plain.output[0].content[0].logprobs == [] and plain.output_text == whole.output_text


def test_items_with_function_calls_are_rendered_like_the_chat_template(client, reference):
    items = [{"role": "developer", "content": SYSTEM},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Read a.py"}]},
             {"type": "function_call", "call_id": "call_1", "name": "read_file",
              "arguments": json.dumps({"path": "a.py"})},
             {"type": "function_call_output", "call_id": "call_1", "output": "print('hi')"}]
    response = client.responses.create(model="m", input=items, tools=TOOLS, temperature=0,
                                       max_output_tokens=10)
    template = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Read a.py"},
                {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
                 "function": {"name": "read_file", "arguments": {"path": "a.py"}}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "print('hi')"}]
    tokens = list(reference.tokenizer.apply_chat_template(template, tools=TEMPLATE_TOOLS,
                                                          add_generation_prompt=True))
    assert response.output_text == reference.generate(tokens, 10)
    assert response.usage.input_tokens == len(tokens)
    assert response.tools[0].name == "read_file"


def test_previous_response_id_continues_the_conversation(client, reference):
    first = client.responses.create(model="m", instructions=SYSTEM, input="Which tests fail?",
                                    max_output_tokens=6, temperature=0)
    second = client.responses.create(model="m", instructions=SYSTEM, input="Fix them.",
                                     previous_response_id=first.id, max_output_tokens=6,
                                     temperature=0)
    conversation = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": "Which tests fail?"},
                    {"role": "assistant", "content": first.output_text},
                    {"role": "user", "content": "Fix them."}]
    assert second.output_text == reference.chat(conversation, 6)
    assert second.previous_response_id == first.id
    # The first request's whole prompt, and the answer as far as its text tokenizes the same.
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    unstored = client.responses.create(model="m", input="hi", max_output_tokens=1, store=False)
    for missing in ("resp_nothing", unstored.id):
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(model="m", input="again", previous_response_id=missing)
        assert error_body(err.value)["code"] == "previous_response_not_found"


@pytest.mark.parametrize("body,param", [
    ({"model": "m"}, "input"),
    ({"model": "m", "input": 7}, "input"),
    ({"model": "m", "input": []}, "input"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0]"),
    ({"model": "m", "input": [{"role": "wizard", "content": "hi"}]}, "input[0].role"),
    ({"model": "m", "input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
    ({"model": "m", "input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{"}]},
     "input[0].arguments"),
    ({"model": "m", "input": "hi", "tools": [{"type": "function", "parameters": {}}]}, "tools[0].name"),
    ({"model": "m", "input": "hi", "tools": ["read_file"]}, "tools[0]"),
    ({"model": "m", "input": "hi", "tool_choice": "maybe"}, "tool_choice"),
    ({"model": "m", "input": "hi", "tools": [{"type": "function", "name": "read_file"}],
      "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"model": "m", "input": "hi", "tool_choice": {"type": "function", "name": "read_file"}}, "tool_choice"),
    ({"model": "m", "input": "hi", "tool_choice": "required"}, "tool_choice"),
    ({"model": "m", "input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": "m", "input": "hi", "temperature": 3}, "temperature"),
    ({"model": "m", "input": "word " * 40_000}, "input"),
])
def test_bad_requests_get_openai_errors(app_daemon, validate, body, param):
    status, response = post(app_daemon, body)
    assert status == 400
    validate(response, "ErrorResponse")
    assert response["error"]["param"] == param


# -- Codex, as recorded -------------------------------------------------------------------
FIXTURES = Path(__file__).parent / "fixtures" / "codex"


def recorded(name: str) -> dict:
    """A request body the Codex CLI sent (wire_api = "responses"), recorded from a real run:
    developer and user messages, function tools, a `namespace` tool of functions, a built-in
    `web_search` tool, `store: false`, `include`, `reasoning`, `prompt_cache_key`. Its prose
    (instructions, tool descriptions) is replaced with synthetic words."""
    return json.loads((FIXTURES / f"{name}.json").read_text())["body"]


def test_recorded_codex_conversations_are_served_and_share_the_cache(app_factory, tiny_model,
                                                                     validate, caplog):
    caplog.set_level(logging.INFO, logger="kvtier.responses")
    daemon = app_factory(tiny_model)
    finals = []
    for name in ("first_conversation", "second_conversation"):
        status, text = post(daemon, dict(recorded(name), max_output_tokens=4))
        assert status == 200, text
        events = sse(text)
        for event in events:
            validate(event, "ResponseStreamEvent")
        finals.append(events[-1]["response"])
    names = [tool.get("name") for tool in finals[0]["tools"]]
    assert "multi_agent_v1" in names and {"type": "web_search", "external_web_access": False} in finals[0]["tools"]
    first, second = (final["usage"] for final in finals)
    assert first["input_tokens_details"]["cached_tokens"] == 0
    # Everything before the question (instructions, tools, environment) came from the cache.
    assert second["input_tokens_details"]["cached_tokens"] > 0.9 * second["input_tokens"]
    assert "built-in tool type 'web_search' is not available here" in caplog.text


def test_a_built_in_tool_type_is_logged_on_one_line(caplog):
    """The type is the client's text: a line break in it wrote a forged ERROR line into the
    daemon's log; it is shown escaped (daemon/client_names.py)."""
    caplog.set_level(logging.INFO, logger="kvtier.responses")
    forged = "web_search_x\n2026-12-08 00:00:00,000 ERROR kvtier.daemon: forged"
    body = validate_body(ResponsesRequest, {"model": "m", "input": "x", "tools": [{"type": forged}]})
    assert parse_tools(body.tools).template is None  # not offered to the model
    [line] = [record.getMessage() for record in caplog.records if "forged" in record.getMessage()]
    assert line == f"built-in tool type {forged!r} is not available here; not offered to the model"


def test_function_calls_in_the_output_match_the_schema(reference, validate):
    """The output side of tool calls, which the random test models never produce: a call the
    real tokenizer's parser reads becomes a function_call item (with its namespace)."""
    shell = {"type": "function", "name": "exec_command", "parameters": {
        "type": "object", "properties": {"cmd": {"type": "string"}}}}
    body = validate_body(ResponsesRequest, {"model": "m", "input": "x", "tools": [
        {"type": "namespace", "name": "shell", "description": "Shell.", "tools": [shell]},
        {"type": "web_search"}]})
    tools = parse_tools(body.tools)
    generated = 'Listing.\n<tool_call>\n{"name": "exec_command", "arguments": {"cmd": "ls"}}\n</tool_call>'
    text, calls = split_tool_calls(generated, reference.tokenizer, tools.template)
    answer = Answer(body, "m", tools, None, GenerationRequest(prompt_tokens=[1], max_tokens=9))
    final = answer.final(text, calls, "stop", Usage(prompt_tokens=10, completion_tokens=9, ram_tokens=6), [])
    validate(final, "Response")
    message, call = final["output"]
    assert message["content"][0]["text"] == "Listing." and final["status"] == "completed"
    assert (call["type"], call["name"], call["namespace"]) == ("function_call", "exec_command", "shell")
    assert json.loads(call["arguments"]) == {"cmd": "ls"}
    parsed = openai.types.responses.Response.model_validate(final)  # as the SDK reads it
    call_item = parsed.output[1]
    assert isinstance(call_item, ResponseFunctionToolCall)
    assert call_item.call_id == calls[0].id and parsed.output_text == "Listing."


def test_a_tool_choice_among_the_tools_offered_is_accepted(app_daemon):
    """A function named in a `namespace` tool (as Codex groups them) may be chosen; "required"
    with only built-in tools is served as "auto" is (they are not offered here)."""
    namespace = {"type": "namespace", "name": "fs", "tools": [{"type": "function", "name": "read_file"}]}
    for tools, choice in [([namespace], {"type": "function", "name": "read_file"}),
                          ([{"type": "web_search"}], "required")]:
        status, _ = post(app_daemon, {"model": "m", "input": "hi", "max_output_tokens": 1,
                                      "tools": tools, "tool_choice": choice})
        assert status == 200, (tools, choice)
