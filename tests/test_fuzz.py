"""Fuzz the published API (/openapi.json) with hypothesis: whatever a client sends, the
daemon answers 2xx or a 4xx with a JSON error in the route's API shape, never a 5xx, and
stays correct afterwards. Hostile values (NaN/Infinity, huge and negative integers, lone
surrogates, deep nesting) go into every field of every POST route, and odd bytes into the
headers the API-key check reads. On the daemon's app served in the test process, over raw
sockets (no client library checks what goes on the wire)."""

from __future__ import annotations

import json
import math
from typing import Any

import jsonschema
import pytest
from aiohttp.web_urldispatcher import AbstractRoute
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon import openapi
from daemon.app import init_app
from daemon.strict_json import MAX_JSON_DEPTH
from kvtier.config import CacheConfig, ServeConfig
from tests.conftest import agent_messages, http_request, raw_http

POST_ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/messages",
               "/v1/messages/count_tokens", "/cache/warm"]


class Raw(str):
    """JSON text sent as is: what json.dumps cannot write (1e400, 5000-digit integers) or
    would recurse over (100,000 levels of nesting)."""

    def __repr__(self) -> str:
        return f"Raw({str(self)[:20]!r}... {len(self)} characters)" if len(self) > 40 else f"Raw({str(self)!r})"


def to_json(value) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {to_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(map(to_json, value)) + "]"
    return json.dumps(value)  # NaN and Infinity come out as Python's JSON writes them


def nested(depth: int) -> Raw:
    return Raw("[" * depth + "]" * depth)


LONE_SURROGATE = st.tuples(st.text(max_size=5), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
                           st.text(max_size=5)).map("".join)  # written as a \udXXX escape
HOSTILE = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.sampled_from([-1, -2**63 - 1, 2**63, 2**64, 10**30, -10**30]), st.integers(),
    st.sampled_from([Raw("1e400"), Raw("-1e400"), Raw("1" + "0" * 5000)]),
    LONE_SURROGATE,
    st.integers(MAX_JSON_DEPTH - 3, MAX_JSON_DEPTH + 3).map(nested), st.just(nested(100_000)),
)
ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False)
                        | st.text(max_size=20), lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
SMALL_TOKENS = st.integers(-3, 3)  # valid requests must stay quick to generate
TOKEN_FIELDS = {"max_tokens", "max_completion_tokens"}
ROLE = st.sampled_from(["system", "user", "user", "assistant", "tool", "developer", "x"])
TEXT_BLOCKS = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=30)}),
                       min_size=1, max_size=2)
MESSAGE = st.fixed_dictionaries({"role": ROLE, "content": st.one_of(
    st.text(min_size=1, max_size=40), TEXT_BLOCKS, ANY_JSON)})
TYPED = {
    "max_tokens": SMALL_TOKENS, "max_completion_tokens": SMALL_TOKENS,
    "messages": st.lists(MESSAGE, min_size=1, max_size=3),
    "model": st.sampled_from(["MODEL", "MODEL", "MODEL", "gpt-4", ""]),
    "prompt": st.text(min_size=1, max_size=60),
    "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=5)),
    "stop_sequences": st.lists(st.text(max_size=5), max_size=3),
    "system": st.one_of(st.text(max_size=40), TEXT_BLOCKS),
}
BY_TYPE: dict[str | None, st.SearchStrategy] = {"boolean": st.booleans(), "integer": st.integers(-2, 3), "number": st.floats(-0.5, 2.5),
           "string": st.text(max_size=20)}
SETTINGS: dict[str, Any] = dict(deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def schema_type(prop: dict) -> str | None:
    """"integer" for {"type": "integer"} and for an optional {"anyOf": [{"type": "integer"}, {"type": "null"}]}."""
    types = [member.get("type") for member in prop.get("anyOf", [prop])]
    return next((kind for kind in types if kind != "null"), None)


def value_for(name: str, prop: dict) -> st.SearchStrategy:
    """Mostly a well-typed value (so valid requests reach generation), sometimes any JSON."""
    typed = TYPED[name] if name in TYPED else BY_TYPE.get(schema_type(prop), ANY_JSON)
    return st.one_of(typed, typed, typed, ANY_JSON.filter(lambda v: not isinstance(v, int) or abs(v) < 4))


def hostile_for(name: str) -> st.SearchStrategy:
    if name in TOKEN_FIELDS:  # a large valid budget would generate up to the context's end
        return HOSTILE.filter(lambda v: not (isinstance(v, int) and v > 3))
    return HOSTILE


def body_for(schema: dict) -> st.SearchStrategy:
    props = schema.get("properties", {})
    required = {n: value_for(n, props.get(n, {})) for n in schema.get("required", [])}
    optional = {n: value_for(n, p) for n, p in props.items() if n not in required}
    return st.fixed_dictionaries(required, optional=optional)


def post(daemon, path: str, body, headers: dict[bytes, bytes] | None = None) -> tuple[int, bytes]:
    return raw_http(daemon.port, http_request("POST", path, headers, to_json(body).encode("ascii")))


def assert_api_answer(path: str, status: int, text: bytes, context) -> None:
    """2xx or 4xx; an error has the route's API shape (a request too broken to have a
    route gets a body both shapes read)."""
    assert status < 500, (context, status, text)
    if status < 400:
        return
    answer = json.loads(text)
    error = answer["error"]
    assert isinstance(error["message"], str) and isinstance(error["type"], str), answer
    if path.startswith("/v1/messages"):
        assert answer["type"] == "error", answer
    else:
        assert "param" in error and "code" in error, answer


@pytest.fixture(scope="module")
def fuzzed_app(tmp_path_factory, llama_model):
    """The module's app caps every answer at 8 tokens (--max-tokens), whatever max_tokens a
    body gives: what is fuzzed is the parsing, and a long answer would only make it slow."""
    from tests.inprocess import InProcessDaemon

    daemon = InProcessDaemon(llama_model, tmp_path_factory.mktemp("fuzz") / "cache", "--max-tokens", "8").start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def spec(fuzzed_app) -> dict:
    return fuzzed_app.get("/openapi.json")


def request_schema(spec: dict, path: str) -> dict:
    return spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]


def test_openapi_document_is_valid_and_complete(spec):
    assert spec["openapi"].startswith("3.1")
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/models", "/health",
                 "/cache/stats", "/cache/entries", "/cache", "/cache/warm", "/metrics"):
        assert path in spec["paths"]
    for item in spec["paths"].values():
        for op in item.values():
            schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if schema:
                jsonschema.Draft202012Validator.check_schema(schema)


def canonical(route: AbstractRoute) -> str:
    assert route.resource is not None  # every route the app adds is on a resource
    return route.resource.canonical


def test_openapi_document_matches_the_routes(tmp_path):
    """Every route the app serves is documented, every POST with its body's schema, and every
    documented route is served: the document cannot drift from the routes."""
    app = init_app(ServeConfig(model=str(tmp_path), cache=CacheConfig(cache_dir=tmp_path)))
    served = {(route.method.lower(), canonical(route)) for route in app.router.routes() if route.method != "HEAD"}
    document = openapi.document()
    documented = {(method, path) for path, item in document["paths"].items() for method in item}
    assert served == documented
    for path in (path for method, path in served if method == "post" and path not in openapi.ACTIONS):
        fields = openapi.POST_BODIES[path].model_fields  # what the route's body model reads
        schema = request_schema(document, path)
        assert set(schema["properties"]) == set(fields)
        assert set(schema.get("required", [])) == {name for name, f in fields.items() if f.is_required()}
    refs = {ref.rsplit("/", 1)[1] for ref in _refs(document)}
    assert refs <= set(document["components"]["schemas"])


def _refs(value) -> list[str]:
    if isinstance(value, dict):
        return ([value["$ref"]] if "$ref" in value else []) + [r for v in value.values() for r in _refs(v)]
    return [r for v in value for r in _refs(v)] if isinstance(value, list) else []


@pytest.mark.parametrize("path", POST_ROUTES)
def test_fuzzed_bodies_never_crash_the_daemon(fuzzed_app, spec, path):
    @settings(max_examples=40, **SETTINGS)
    @given(body_for(request_schema(spec, path)))
    def check(body):
        if body.get("model") == "MODEL":
            body["model"] = str(fuzzed_app.model)
        if path == "/cache/warm":
            body.pop("messages", None)  # warming real prompts is slow; its validation is what we fuzz
        status, text = post(fuzzed_app, path, body)
        assert_api_answer(path, status, text, body)

    check()
    assert fuzzed_app.get("/health")["status"] == "ok"


def valid_body(path: str, model: str) -> dict:
    """A small request each route accepts; a hostile value then replaces one part of it."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "hi"}]
    if path == "/v1/completions":
        return {"model": model, "prompt": "hi", "max_tokens": 2}
    if path == "/cache/warm":
        return {"prompt": "hi"}
    if path == "/v1/chat/completions":  # with a tool call, whose arguments are JSON text
        call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        messages += [{"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": "c1", "content": "ok"}]
    body = {"model": model, "messages": messages}
    return body if path.endswith("count_tokens") else dict(body, max_tokens=2)


def places(spec: dict, path: str) -> list[tuple]:
    """Every field of the route's schema, parts of a message, and a field nobody knows."""
    fields: list[tuple] = [(name,) for name in request_schema(spec, path)["properties"]]
    if path == "/cache/warm":
        fields.remove(("messages",))  # warming real prompts is slow; its parser is the chat one
    elif path != "/v1/completions":
        fields += [("messages", 0, "content"), ("messages", 0, "role"), ("messages", 0, "name")]
    if path == "/v1/chat/completions":
        fields += [("messages", 1, "tool_calls", 0, "function", "arguments")]
    return fields + [("unknown_field",)]


def put(body: dict, place: tuple, value) -> None:
    target = body
    for key in place[:-1]:
        target = target[key]
    target[place[-1]] = value


@pytest.mark.parametrize("path", POST_ROUTES)
def test_hostile_values_in_any_field_never_crash_the_daemon(fuzzed_app, spec, path):
    @settings(max_examples=30, **SETTINGS)
    @given(st.sampled_from(places(spec, path)).flatmap(lambda place: st.tuples(st.just(place),
                                                                               hostile_for(place[-1]))))
    def check(case):
        place, value = case
        body = valid_body(path, str(fuzzed_app.model))
        if place[-1] == "arguments":
            value = to_json(value)  # OpenAI's arguments are JSON text in a string
        put(body, place, value)
        status, text = post(fuzzed_app, path, body)
        assert_api_answer(path, status, text, (place, str(value)[:80]))

    check()


ROUTES = [("POST", path) for path in POST_ROUTES] + [
    ("GET", path) for path in ("/v1/models", "/health", "/cache/stats", "/cache/entries", "/metrics")]
HEADER_BYTES = st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b)
KEY_VALUE = st.one_of(HEADER_BYTES, HEADER_BYTES.map(lambda b: b"Bearer " + b),
                      st.sampled_from([b"Bearer s3cret", b"s3cret", b"Bearer s3cret\xff", b"s3cret\x00",
                                       b"Bearer \xff\xfe", b"\xc3(", b"Bearer " + b"\x80" * 9000]))
# Framing headers (Content-Length, Expect, Upgrade) are the test's own: a wrong one would
# make the daemon wait for a body that never comes.
HEADER_NAME = st.one_of(st.sampled_from([b"Content-Type", b"Content-Encoding", b"Transfer-Encoding",
                                         b"Accept", b"Accept-Encoding", b"Connection", b"Host"]),
                        st.binary(min_size=1, max_size=12).filter(
                            lambda b: not set(b) & set(b"\r\n:") and b.strip().lower() not in (
                                b"content-length", b"expect", b"upgrade")))


def test_odd_header_bytes_never_crash_the_keyed_app(keyed_app):
    @settings(max_examples=60, **SETTINGS)
    @given(st.sampled_from(ROUTES), st.sampled_from([b"Authorization", b"x-api-key"]), KEY_VALUE,
           st.dictionaries(HEADER_NAME, HEADER_BYTES, max_size=2))
    def check(route, key_header, key, extra):
        method, path = route
        headers = {**extra, key_header: key}
        status, text = raw_http(keyed_app.port, http_request(method, path, headers, b"{}"))
        assert_api_answer(path, status, text, headers)

    check()
    assert keyed_app.get("/health")["status"] == "ok"


def test_still_exact_after_fuzzing(fuzzed_app, reference):
    messages = agent_messages("after-fuzz")
    response = fuzzed_app.client().chat.completions.create(
        model=str(fuzzed_app.model), messages=messages, max_tokens=8, temperature=0)
    assert response.choices[0].message.content == reference.chat(messages, 8)
