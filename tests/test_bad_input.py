"""Bad input gets a 4xx in the API's own error shape, never a 500 (nor a 200 with garbage).
Sent as raw bytes (no client library checks what goes on the wire) to the app served in
this process: a subprocess would add only its start-up."""

from __future__ import annotations

import gzip
import json
import logging
import socket

import pytest

from tests.conftest import agent_messages, error_body, http_request, model_variant, raw_http

MESSAGES = [{"role": "user", "content": "hi"}]
ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/messages/count_tokens",
          "/cache/warm"]


def body_for(route: str, model: str, text: str = '"hi"') -> str:
    """A valid body for `route` as JSON text, its one prompt string given as JSON text."""
    messages = f'[{{"role": "user", "content": {text}}}]'
    return {"/v1/chat/completions": f'{{"model": "{model}", "messages": {messages}, "max_tokens": 2}}',
            "/v1/completions": f'{{"model": "{model}", "prompt": {text}, "max_tokens": 2}}',
            "/v1/messages": f'{{"model": "{model}", "messages": {messages}, "max_tokens": 2}}',
            "/v1/messages/count_tokens": f'{{"model": "{model}", "messages": {messages}}}',
            "/cache/warm": f'{{"prompt": {text}}}'}[route]


def send(daemon, route: str, body: str | bytes, headers: dict[bytes, bytes] | None = None,
         method: str = "POST") -> tuple[int, dict]:
    raw = body.encode() if isinstance(body, str) else body
    status, answer = raw_http(daemon.port, http_request(method, route, headers, raw))
    return status, json.loads(answer)


def assert_api_error(route: str, status: int, answer: dict, expected: int = 400, words: str = "") -> None:
    """The error shape of the route's API: Anthropic's on /v1/messages*, OpenAI's elsewhere."""
    assert status == expected, answer
    error = answer["error"]
    if route.startswith("/v1/messages"):
        assert answer["type"] == "error" and set(error) == {"type", "message"}
    else:
        assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"] or words == error.get("param"), answer


@pytest.mark.parametrize("route", ROUTES)
def test_lone_surrogate_in_the_prompt_is_a_400(app_daemon, route):
    status, answer = send(app_daemon, route, body_for(route, str(app_daemon.model), r'"a\ud800b"'))
    assert_api_error(route, status, answer, words="surrogate")
    # A surrogate pair is one valid character, and still works.
    ok, _ = send(app_daemon, route, body_for(route, str(app_daemon.model), r'"\ud83d\ude00"'))
    assert ok == 200


@pytest.mark.parametrize("route,body", [
    ("/v1/responses", {"input": "x", "tools": [{"type": {}}]}),
    ("/v1/responses", {"input": [{"type": ["message"], "role": "user", "content": "x"}]}),
    ("/v1/messages", {"max_tokens": 2, "messages": [{"role": "user", "content": [{"type": [], "text": "x"}]}]}),
    ("/v1/messages", {"max_tokens": 2, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": {}}]}),
], ids=["responses-tool", "responses-item", "messages-block", "messages-tool"])
def test_a_type_that_is_a_list_or_an_object_is_a_400(app_daemon, route, body):
    """A part's `type` that is not a string is refused like any unknown one, not a 500."""
    status, answer = send(app_daemon, route, json.dumps(dict(body, model=str(app_daemon.model))))
    assert_api_error(route, status, answer)


@pytest.mark.parametrize("seed", [10**30, -1, 2**64])
def test_seed_outside_what_mlx_accepts_is_a_400(app_daemon, seed):
    body = {"model": str(app_daemon.model), "prompt": "hi", "max_tokens": 2, "seed": seed}
    status, answer = send(app_daemon, "/v1/completions", json.dumps(body))
    assert_api_error("/v1/completions", status, answer, words="seed")


def test_largest_seed_is_accepted(app_daemon):
    body = {"model": str(app_daemon.model), "prompt": "hi", "max_tokens": 2, "seed": 2**64 - 1,
            "temperature": 1.0}
    assert send(app_daemon, "/v1/completions", json.dumps(body))[0] == 200


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/messages"])
def test_deeply_nested_json_is_a_400(app_daemon, route):
    status, answer = send(app_daemon, route, "[" * 100_000 + "]" * 100_000)
    assert_api_error(route, status, answer, words="nested")
    # Deep enough to parse, too deep for what later recurses over it (a tool's schema).
    deep = '{"a": ' * 70 + "1" + "}" * 70
    tools = (f'[{{"type": "function", "function": {{"name": "f", "parameters": {deep}}}}}]'
             if route == "/v1/chat/completions" else f'[{{"name": "f", "input_schema": {deep}}}]')
    body = body_for(route, str(app_daemon.model))[:-1] + f', "tools": {tools}}}'
    status, answer = send(app_daemon, route, body)
    assert_api_error(route, status, answer, words="nested")


@pytest.mark.parametrize("arguments", ["[" * 100_000 + "]" * 100_000, '{"path": "\\ud800"}',
                                       '{"path": NaN}'], ids=["deep", "lone-surrogate", "nan"])
def test_tool_call_arguments_are_parsed_as_strictly_as_the_body(app_daemon, arguments):
    """OpenAI sends an assistant tool call's arguments as JSON text inside a string."""
    call = {"id": "c1", "type": "function", "function": {"name": "read_file", "arguments": arguments}}
    body = {"model": str(app_daemon.model), "max_tokens": 2, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}]}
    status, answer = send(app_daemon, "/v1/chat/completions", json.dumps(body))
    assert_api_error("/v1/chat/completions", status, answer)
    assert answer["error"]["param"].startswith("messages[1].tool_calls[0].function.arguments")


@pytest.mark.parametrize("route,name,value", [
    ("/v1/chat/completions", "temperature", "NaN"), ("/v1/chat/completions", "top_p", "NaN"),
    ("/v1/completions", "temperature", "Infinity"), ("/v1/completions", "top_p", "-Infinity"),
    ("/v1/messages", "temperature", "NaN"), ("/v1/messages", "top_p", "NaN"),
    ("/v1/chat/completions", "temperature", "1e400"),
    ("/v1/completions", "temperature", "1" + "0" * 400),   # an int too large for a float
    ("/v1/messages", "max_tokens", "1" + "0" * 5000),      # too many digits for Python's int()
])
def test_non_finite_and_oversized_numbers_are_a_400(app_daemon, route, name, value):
    body = json.loads(body_for(route, str(app_daemon.model)))
    body[name] = "VALUE"
    status, answer = send(app_daemon, route, json.dumps(body).replace('"VALUE"', value))
    assert_api_error(route, status, answer)


def test_body_is_read_as_utf8_whatever_the_charset_says(app_daemon):
    route = "/v1/completions"
    headers = {b"Content-Type": b"application/json; charset=no-such-codec"}
    assert send(app_daemon, route, body_for(route, str(app_daemon.model)), headers)[0] == 200
    status, answer = send(app_daemon, route, b'{"prompt": "\xff"}')
    assert_api_error(route, status, answer, words="UTF-8")


def test_broken_compressed_body_is_a_400(app_daemon):
    route = "/v1/messages"
    good = gzip.compress(body_for(route, str(app_daemon.model)).encode())
    assert send(app_daemon, route, good, {b"Content-Encoding": b"gzip"})[0] == 200
    status, answer = send(app_daemon, route, good[:20] + b"garbage" * 10, {b"Content-Encoding": b"gzip"})
    assert_api_error(route, status, answer)


@pytest.mark.parametrize("header", [b"Authorization", b"x-api-key"])
@pytest.mark.parametrize("route", ["/v1/messages", "/v1/models", "/v1/chat/completions"])
def test_non_utf8_api_key_is_a_401_in_the_route_shape(keyed_app, header, route):
    value = b"Bearer \xff\xfe\x80" if header == b"Authorization" else b"\xff\xc3("
    method = "GET" if route == "/v1/models" else "POST"
    status, answer = send(keyed_app, route, "{}", {header: value}, method=method)
    assert_api_error(route, status, answer, expected=401, words="API key")
    # The right key, sent the same way, still opens the door.
    right = b"Bearer s3cret" if header == b"Authorization" else b"s3cret"
    assert send(keyed_app, route, "{}", {header: right}, method=method)[0] in (200, 400)


@pytest.mark.parametrize("request_bytes", [
    http_request("GET", "/v1/models?" + "a" * 10_000),
    http_request("GET", "/health", {b"X-Big": b"a" * 10_000}),
    http_request("POST", "/v1/messages", {b"X-Bad\x01Name": b"1"}, b"{}"),
], ids=["long-url", "long-header", "bad-header-name"])
def test_unparsable_requests_get_a_json_error(app_daemon, request_bytes):
    status, answer = raw_http(app_daemon.port, request_bytes)
    answer = json.loads(answer)
    # No route was matched, so the body reads as both APIs' errors.
    assert status == 400 and answer["type"] == "error"
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["message"]
    assert app_daemon.get("/health")["status"] == "ok"



def _chunked(chunks: bytes) -> bytes:
    return (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunks)


MALFORMED_FRAMING = {
    "letters-in-content-length": http_request("POST", "/v1/completions", {b"Content-Length": b"abc"}, b"{}"),
    "negative-content-length": http_request("POST", "/v1/completions", {b"Content-Length": b"-1"}),
    "bad-chunk-size": _chunked(b"zz\r\n{}\r\n0\r\n\r\n"),
    "bad-chunk-size-after-a-chunk": _chunked(b"1\r\n{\r\nzz\r\n}\r\n0\r\n\r\n"),
    "chunk-size-overflow": _chunked(b"ffffffffffffffffffff\r\n{}\r\n0\r\n\r\n"),
    "not-the-gzip-it-says": http_request("POST", "/v1/completions", {b"Content-Encoding": b"gzip"},
                                         b"not gzip at all " * 8),
    "0xff-in-the-url": http_request("GET", b"/v1/models\xff"),
    "8kb-header": http_request("GET", "/health", {b"X-Big": b"a" * 8200}),
    "nul-in-a-header": http_request("GET", "/health", {b"X-Nul": b"a\x00b"}),
}


def exchange_until_closed(port: int, request: bytes) -> tuple[int, dict]:
    """Send `request`, read until the daemon closes the connection (by then it has logged
    all it logs about it); return the status and the JSON body."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


@pytest.mark.parametrize("request_bytes", MALFORMED_FRAMING.values(), ids=MALFORMED_FRAMING.keys())
def test_malformed_framing_is_a_400_logged_as_one_line(app_daemon, caplog, request_bytes):
    caplog.set_level(logging.INFO)
    status, answer = exchange_until_closed(app_daemon.port, request_bytes)
    assert status == 400 and answer["error"]["type"] == "invalid_request_error", answer
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not loud, [r.getMessage() for r in loud]
    noted = [r.getMessage() for r in caplog.records if r.name == "kvtier.daemon"]
    assert len(noted) == 1 and "malformed request" in noted[0] and "\n" not in noted[0], noted

ALTERNATE = ("{%- for m in messages -%}{%- if loop.index0 > 0 and m.role == 'user' and "
             "messages[loop.index0 - 1].role == 'user' -%}{{ raise_exception('Conversation roles "
             "must alternate user/assistant/user/assistant/...') }}{%- endif -%}{%- endfor -%}")


@pytest.fixture
def strict_template_model(llama_model, tmp_path):
    """The test model with a chat template that, like Llama's and Mistral's, refuses two user
    turns in a row (the weights are linked, not copied)."""
    model = tmp_path / "strict"
    model.mkdir()
    for path in llama_model.iterdir():
        (model / path.name).symlink_to(path)
    (model / "tokenizer_config.json").unlink()
    config = json.loads((llama_model / "tokenizer_config.json").read_text())
    config["chat_template"] = ALTERNATE + config["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    return model


def test_messages_the_chat_template_refuses_are_a_400(app_factory, strict_template_model):
    daemon = app_factory(strict_template_model)
    model = str(strict_template_model)
    twice = [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]
    for route, body in [("/v1/chat/completions", {"model": model, "messages": twice, "max_tokens": 2}),
                        ("/v1/messages", {"model": model, "messages": twice, "max_tokens": 2}),
                        ("/v1/messages/count_tokens", {"model": model, "messages": twice}),
                        ("/cache/warm", {"messages": twice})]:
        status, answer = send(daemon, route, json.dumps(body))
        assert_api_error(route, status, answer, words="must alternate")
    once = [{"role": "user", "content": "hi"}]
    assert send(daemon, "/v1/chat/completions", json.dumps({"model": model, "messages": once,
                                                            "max_tokens": 2}))[0] == 200


def test_a_token_beyond_the_models_embedding_is_a_400_not_a_crash(tmp_path, daemon_factory, llama_model, reference):
    """A tokenizer with more tokens than the model has embeddings (an added token past
    vocab_size): MLX reads out of bounds on such an id and the process dies."""
    import openai

    def add_token(tokenizer: dict) -> None:
        rows = json.loads((llama_model / "config.json").read_text())["vocab_size"]
        tokenizer["added_tokens"].append({"id": rows + 100, "content": "<|beyond|>", "single_word": False,
                                          "lstrip": False, "rstrip": False, "normalized": False,
                                          "special": True})

    model = model_variant(llama_model, tmp_path / "beyond", "tokenizer.json", add_token)
    daemon = daemon_factory(model)
    client = daemon.client()
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=str(model), max_tokens=4,
                                       messages=[{"role": "user", "content": "Say <|beyond|> now."}])
    assert "embedding" in error_body(err.value)["message"]
    with pytest.raises(openai.BadRequestError):  # streamed: refused before the stream starts
        list(client.chat.completions.create(model=str(model), max_tokens=4, stream=True,
                                            messages=[{"role": "user", "content": "<|beyond|>"}]))
    messages = agent_messages("beyond")
    reply = client.chat.completions.create(model=str(model), messages=messages, max_tokens=4, temperature=0)
    assert reply.choices[0].message.content == reference.chat(messages, 4)


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("value", [True, False])
def test_a_boolean_is_no_choice_count(app_daemon, route, value):
    # JSON booleans are not numbers (docs/api.md); `n` used to take true as its 1.
    body = json.loads(body_for(route, str(app_daemon.model)))
    status, answer = send(app_daemon, route, json.dumps(dict(body, n=value)))
    assert_api_error(route, status, answer, words="n")


def test_warming_an_empty_prompt_is_a_400(app_daemon):
    status, answer = send(app_daemon, "/cache/warm", '{"prompt": ""}')
    assert_api_error("/cache/warm", status, answer, words="prompt")
