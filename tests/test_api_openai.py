"""The OpenAI-compatible API, judged by the real `openai` client and OpenAI's own schema, on
the daemon's app served in the test process."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import openai
import pytest

from tests.conftest import agent_messages, error_body, openai_spec, post

SPEC = openai_spec() or Path("shared/specs/openai-openapi.json")


def _null_to_type(node):
    """The spec still writes OpenAPI 3.0's `nullable: true`; make it a JSON-schema null type."""
    if isinstance(node, dict):
        node = {k: _null_to_type(v) for k, v in node.items()}
        if node.pop("nullable", False):
            return {"anyOf": [node, {"type": "null"}]}
        return node
    if isinstance(node, list):
        return [_null_to_type(v) for v in node]
    return node


@pytest.fixture(scope="module")
def validate():
    if not SPEC.exists():
        pytest.skip(f"OpenAI spec not found at {SPEC}")
    components = _null_to_type(json.loads(SPEC.read_text())["components"])

    def check(instance: dict, schema_name: str) -> None:
        schema = {"$ref": f"#/components/schemas/{schema_name}", "components": components}
        jsonschema.Draft202012Validator(schema).validate(instance)

    return check



def test_chat_completion_matches_schema(app_daemon, validate):
    body = {"model": str(app_daemon.model), "messages": agent_messages(), "max_tokens": 8,
            "temperature": 0}
    status, response, _ = post(app_daemon, "/v1/chat/completions", body)
    assert status == 200
    validate(response, "CreateChatCompletionResponse")
    assert response["usage"]["prompt_tokens_details"]["cached_tokens"] >= 0
    assert set(response["usage"]["kvtier"]) >= {"ram_tokens", "disk_tokens", "computed_tokens"}


def test_stream_chunks_match_schema_and_equal_non_stream(app_daemon, validate, reference):
    messages = agent_messages(question="Stream it.")
    body = {"model": str(app_daemon.model), "messages": messages, "max_tokens": 12,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    status, text, headers = post(app_daemon, "/v1/chat/completions", body)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert content == reference.chat(messages, 12)
    assert chunks[-1]["usage"]["completion_tokens"] == 12 and chunks[-1]["choices"] == []


def test_completions_and_models_match_schema(app_daemon, validate, reference):
    prompt = "def read_config(path):\n    " * 20
    body = {"model": str(app_daemon.model), "prompt": prompt, "max_tokens": 10, "temperature": 0}
    status, response, _ = post(app_daemon, "/v1/completions", body)
    assert status == 200
    validate(response, "CreateCompletionResponse")
    tokens = list(reference.tokenizer.encode(prompt))
    assert response["choices"][0]["text"] == reference.generate(tokens, 10)
    models = app_daemon.get("/v1/models")
    validate(models, "ListModelsResponse")
    assert [m["id"] for m in models["data"]] == [str(app_daemon.model)]


def test_completion_echo_gives_the_prompt_then_the_same_completion(app_daemon, validate, reference):
    """`echo` on the legacy completions route: the prompt's text, then the text the model
    gives without it, streamed or not (it was ignored: the prompt was missing)."""
    client = app_daemon.client()
    prompt = "def read_config(path):\n    " * 20
    expected = prompt + reference.generate(list(reference.tokenizer.encode(prompt)), 8)
    whole = client.completions.create(model=str(app_daemon.model), prompt=prompt, max_tokens=8,
                                      temperature=0, echo=True)
    validate(whole.model_dump(mode="json", exclude_unset=True), "CreateCompletionResponse")
    streamed = client.completions.create(model=str(app_daemon.model), prompt=prompt, max_tokens=8,
                                         temperature=0, echo=True, stream=True)
    assert whole.choices[0].text == expected
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == expected


@pytest.mark.parametrize("extra,param", [
    ({"best_of": 2}, "best_of"), ({"suffix": "\n    return config"}, "suffix"),
    ({"logprobs": 2, "echo": True}, "logprobs"),  # the prompt's: a cached prefix has none
])
def test_completion_options_not_served_are_refused_by_name(app_daemon, validate, extra, param):
    """Asked for, what this server does not make is a 400 naming the field, not a response
    that silently lacks it."""
    body = {"model": str(app_daemon.model), "prompt": "def f():", "max_tokens": 2, **extra}
    code, response, _ = post(app_daemon, "/v1/completions", body)
    assert code == 400
    validate(response, "ErrorResponse")
    assert response["error"]["param"] == param


def _entries(logprobs) -> list[tuple[str, float, list[tuple[str, float]]]]:
    """An SDK's per-token entries as (token, logprob, [(alternative, logprob), ...])."""
    return [(e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs]) for e in logprobs]


def _assert_logprobs_of_mlx_lm(entries: list[tuple[str, float, list[tuple[str, float]]]], top: int,
                               reference, tokens: list[int]) -> None:
    """Each token's log-probability and its `top` likeliest alternatives are plain mlx-lm's,
    step for step (greedy: the token is the likeliest)."""
    tokenizer = reference.tokenizer
    expected = reference.logprobs(tokens, len(entries))
    assert entries
    for (text, logprob, alternatives), (token, row) in zip(entries, expected):
        assert text == tokenizer.decode([token])
        assert logprob == pytest.approx(row[token], abs=1e-4)
        likeliest = sorted(range(len(row)), key=lambda i: -row[i])[:top]
        assert [t for t, _ in alternatives] == [tokenizer.decode([i]) for i in likeliest]
        assert [v for _, v in alternatives] == pytest.approx([row[i] for i in likeliest], abs=1e-4)
        assert not alternatives or alternatives[0][1] == pytest.approx(logprob, abs=1e-6)


def test_chat_logprobs_are_mlx_lm_s_streamed_or_not(app_daemon, validate, reference):
    """`logprobs` and `top_logprobs` on chat: an entry per generated token, in OpenAI's
    schema, with plain mlx-lm's numbers; the stream's entries are the whole answer's
    (it was a 400: not served). Asked a second time, the prompt comes from the cache."""
    client = app_daemon.client()
    messages = agent_messages(question="Which tests fail?")
    asked = dict(model=str(app_daemon.model), messages=messages, max_tokens=6, temperature=0,
                 logprobs=True, top_logprobs=3)
    whole = client.chat.completions.create(**asked)
    validate(whole.model_dump(mode="json", exclude_unset=True), "CreateChatCompletionResponse")
    content = whole.choices[0].logprobs.content
    spelled = b"".join(bytes(e.bytes) for e in content).decode(errors="replace")
    # The tokens' own bytes; the text, as mlx-lm's detokenizer gives it, drops a leading space.
    assert spelled.removeprefix(" ") == whole.choices[0].message.content.removeprefix(" ")
    assert len(content) == whole.usage.completion_tokens
    entries = _entries(content)
    _assert_logprobs_of_mlx_lm(entries, 3, reference, reference.chat_tokens(messages))

    streamed = client.chat.completions.create(**asked, stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    for chunk in chunks:
        validate(chunk.model_dump(mode="json", exclude_unset=True), "CreateChatCompletionStreamResponse")
    again = [e for c in chunks if c.choices for e in c.choices[0].logprobs.content]
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
    assert _entries(again) == entries


def test_completion_logprobs_with_offsets(app_daemon, validate, reference):
    """The legacy route's `logprobs` (tokens, token_logprobs, top_logprobs, text_offset),
    streamed or not, with plain mlx-lm's numbers."""
    client = app_daemon.client()
    prompt = "def parse_args(argv):\n    " * 12
    asked = dict(model=str(app_daemon.model), prompt=prompt, max_tokens=6, temperature=0, logprobs=2)
    whole = client.completions.create(**asked)
    validate(whole.model_dump(mode="json", exclude_unset=True), "CreateCompletionResponse")
    choice = whole.choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == whole.usage.completion_tokens
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(len(logprobs.tokens))]
    entries = [(t, v, list(top.items())) for t, v, top in
               zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs)]
    _assert_logprobs_of_mlx_lm(entries, 2, reference, list(reference.tokenizer.encode(prompt)))

    streamed = [c.choices[0] for c in client.completions.create(**asked, stream=True) if c.choices]
    assert [t for c in streamed for t in c.logprobs.tokens] == logprobs.tokens
    assert [v for c in streamed for v in c.logprobs.token_logprobs] == logprobs.token_logprobs
    assert [o for c in streamed for o in c.logprobs.text_offset] == logprobs.text_offset


def test_options_that_ask_for_nothing_are_accepted(app_daemon):
    """The values clients send by default: no log probabilities, one completion, no suffix."""
    client = app_daemon.client()
    model, messages = str(app_daemon.model), [{"role": "user", "content": "hi"}]
    client.chat.completions.create(model=model, messages=messages, max_tokens=2, logprobs=False, top_logprobs=0)
    client.completions.create(model=model, prompt="def f():", max_tokens=2, best_of=1, suffix="", echo=False)


def test_stop_sequences_max_tokens_and_seed(app_daemon, reference):
    client = app_daemon.client()
    messages = agent_messages(question="Say something.")
    full = reference.chat(messages, 20)
    stop = full[5:8]
    response = client.chat.completions.create(model=str(app_daemon.model), messages=messages,
                                              max_tokens=20, temperature=0, stop=[stop])
    assert response.choices[0].message.content == full[: full.index(stop)]
    assert response.choices[0].finish_reason == "stop"
    response = client.chat.completions.create(model=str(app_daemon.model), messages=messages,
                                              max_tokens=3, temperature=0)
    assert response.choices[0].finish_reason == "length" and response.usage.completion_tokens == 3
    sampled = [client.chat.completions.create(model=str(app_daemon.model), messages=messages,
                                              max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
               .choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


READ_FILE = {"type": "function", "function": {"name": "read_file", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("body,status,param", [
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ({"model": "MODEL"}, 400, "messages"),
    ({"model": "MODEL", "messages": []}, 400, "messages"),
    ({"model": "MODEL", "messages": "hello"}, 400, "messages"),
    ({"model": "MODEL", "messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    ({"model": "MODEL", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "10"}, 400, "max_tokens"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}, 400, "messages"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "temperature"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "stop": 3}, 400, "stop"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "logprobs": True,
      "top_logprobs": 21}, 400, "top_logprobs"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "tools": [READ_FILE],
      "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, "tool_choice"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}],
      "tool_choice": {"type": "function", "function": {"name": "read_file"}}}, 400, "tool_choice"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"},
     400, "tool_choice"),
])
def test_bad_chat_requests_get_openai_errors(app_daemon, validate, body, status, param):
    body = {k: (str(app_daemon.model) if v == "MODEL" else v) for k, v in body.items()}
    code, response, _ = post(app_daemon, "/v1/chat/completions", body)
    assert code == status
    validate(response, "ErrorResponse")
    assert response["error"]["param"] == param


def test_a_stop_list_too_long_says_so():
    """A union's member whose type the value has explains the refusal: five stop strings
    are "at most 4 items", not "should be a valid string"."""
    from daemon.bodies import validate
    from daemon.bodies_openai import ChatCompletionRequest
    from daemon.errors import InvalidField

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}
    with pytest.raises(InvalidField) as refused:
        validate(ChatCompletionRequest, body)
    assert refused.value.path == ("stop",) and "at most 4" in refused.value.detail


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
def test_malformed_bodies_are_rejected(app_daemon, validate, raw):
    code, response, _ = post(app_daemon, "/v1/chat/completions", None, raw=raw)
    assert code == 400
    validate(response, "ErrorResponse")


def test_prompt_longer_than_context_is_rejected_and_daemon_stays_healthy(app_daemon):
    client = app_daemon.client()
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=str(app_daemon.model), prompt="word " * 40_000, max_tokens=4)
    assert error_body(err.value)["code"] == "context_length_exceeded"
    assert app_daemon.get("/health")["status"] == "ok"


@pytest.mark.parametrize("path, field", [("/v1/chat/completions", "messages"), ("/v1/completions", "prompt")])
def test_max_tokens_past_the_context_names_the_route_s_prompt_field(app_daemon, validate, path, field):
    """OpenAI's policy refuses a prompt and max_tokens that do not fit; the error's `param`
    is the field the route has (the legacy completions named "messages")."""
    body = {"model": str(app_daemon.model), "max_tokens": 40_000,
            field: [{"role": "user", "content": "Hi."}] if field == "messages" else "Hi."}
    code, response, _ = post(app_daemon, path, body)
    assert code == 400 and (response["error"]["code"], response["error"]["param"]) == ("context_length_exceeded", field)
    assert "max_tokens asks for 40000 more" in response["error"]["message"]
    validate(response, "ErrorResponse")


def test_unknown_route_is_a_json_404(app_daemon, validate):
    code, response, _ = post(app_daemon, "/v1/nothing", {})
    assert code == 404
    validate(response, "ErrorResponse")


def test_max_completion_tokens_wins_over_the_deprecated_max_tokens(app_daemon):
    """OpenAI's current field bounds the answer when a client sends both."""
    client = app_daemon.client()
    for max_tokens, max_completion_tokens in [(3, 2), (2, 3)]:
        response = client.chat.completions.create(
            model=str(app_daemon.model), messages=agent_messages(question=f"both {max_tokens}"),
            max_tokens=max_tokens, max_completion_tokens=max_completion_tokens, temperature=0)
        assert response.usage is not None
        assert response.usage.completion_tokens == max_completion_tokens, (max_tokens, max_completion_tokens)
        assert response.choices[0].finish_reason == "length"


def test_retrieve_model_gives_the_entry_models_lists(app_daemon, validate):
    """`client.models.retrieve` (GET /v1/models/{model}): the /v1/models entry of that name,
    sent %2F-encoded (the SDK) or with its slashes as they are; a name not listed is a 404."""
    listed = app_daemon.get("/v1/models")["data"]
    name = str(app_daemon.model)  # a path: slashes in the name
    model = app_daemon.client().models.retrieve(name)
    entry = model.model_dump(exclude_unset=True)
    validate(entry, "Model")
    assert [entry] == [m for m in listed if m["id"] == name]
    assert app_daemon.get(f"/v1/models/{name}") == entry
    with pytest.raises(openai.NotFoundError) as missing:
        app_daemon.client().models.retrieve("gpt-9")
    assert missing.value.code == "model_not_found"
    reply = app_daemon.request("GET", "/v1/models/gpt-9")
    assert reply.status == 404
    validate(reply.json(), "ErrorResponse")
    assert reply.json()["error"]["param"] == "model"
