"""Fuzz the published API (/openapi.json) with hypothesis: whatever a client sends, the
daemon answers 2xx or a 4xx with a JSON error, never a 5xx, and stays correct afterwards."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import agent_messages

ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False)
                        | st.text(max_size=20), lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
SMALL_TOKENS = st.integers(-3, 3)  # valid requests must stay quick to generate
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
BY_TYPE = {"boolean": st.booleans(), "integer": st.integers(-2, 3), "number": st.floats(-0.5, 2.5),
           "string": st.text(max_size=20)}


def value_for(name: str, prop: dict) -> st.SearchStrategy:
    """Mostly a well-typed value (so valid requests reach generation), sometimes any JSON."""
    typed = TYPED[name] if name in TYPED else BY_TYPE.get(prop.get("type"), ANY_JSON)
    return st.one_of(typed, typed, typed, ANY_JSON.filter(lambda v: not isinstance(v, int) or abs(v) < 4))


def body_for(schema: dict) -> st.SearchStrategy:
    props = schema.get("properties", {})
    required = {n: value_for(n, props.get(n, {})) for n in schema.get("required", [])}
    optional = {n: value_for(n, p) for n, p in props.items() if n not in required}
    return st.fixed_dictionaries(required, optional=optional)


def post(daemon, path: str, body) -> tuple[int, str]:
    request = urllib.request.Request(daemon.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def spec(shared_daemon) -> dict:
    with urllib.request.urlopen(shared_daemon.url + "/openapi.json") as r:
        return json.loads(r.read())


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


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/messages",
                                  "/v1/messages/count_tokens", "/cache/warm"])
def test_fuzzed_bodies_never_crash_the_daemon(shared_daemon, spec, path):
    schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]

    @settings(max_examples=40, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(body_for(schema))
    def check(body):
        if body.get("model") == "MODEL":
            body["model"] = str(shared_daemon.model)
        if path == "/cache/warm":
            body.pop("messages", None)  # warming real prompts is slow; its validation is what we fuzz
        status, text = post(shared_daemon, path, body)
        assert status < 500, (body, status, text)
        if status >= 400:
            error = json.loads(text)
            assert "error" in error and isinstance(error["error"]["message"], str)

    check()
    health = json.loads(urllib.request.urlopen(shared_daemon.url + "/health").read())
    assert health["status"] == "ok"


def test_still_exact_after_fuzzing(shared_daemon, reference):
    messages = agent_messages("after-fuzz")
    response = shared_daemon.client().chat.completions.create(
        model=str(shared_daemon.model), messages=messages, max_tokens=8, temperature=0)
    assert response.choices[0].message.content == reference.chat(messages, 8)
