"""A web page must not reach the daemon (issue 34, docs/security.md): requests as a browser
sends them, raw over http.client to the app served in this process. A DNS-rebinding page's
requests name the attacker's host; a cross-site page's carry its Origin, and without a CORS
preflight only text/plain, form or multipart bodies."""

from __future__ import annotations

import http.client
import json
from typing import Any

import anthropic
import pytest

OWN_TEXT = "zebra-secret-4711"  # a prompt's words, which /cache/entries must not show by default
CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [  # (method, path, JSON body): one of each route family
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 2}),
    ("GET", "/v1/models", None),
    ("POST", "/v1/messages", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("POST", "/v1/messages/count_tokens", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/v1/responses", {"model": "m", "input": "hi", "max_output_tokens": 2}),
    ("GET", "/cache/stats", None),
    ("GET", "/cache/entries", None),
    ("DELETE", "/cache?all=true", None),
    ("POST", "/cache/warm", {"prompt": "a system prompt"}),
    ("GET", "/metrics", None),
    ("GET", "/health", None),
    ("GET", "/openapi.json", None),
]


def send(app, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request with exactly these headers (http.client adds only Content-Length, and Host
    when none is given)."""
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=300)
    try:
        conn.request(method, path, body, headers or {})
        response = conn.getresponse()
        return response.status, dict(response.headers), response.read()
    finally:
        conn.close()


def post_json(app, path: str, body: dict, **headers: str) -> tuple[int, dict[str, str], bytes]:
    return send(app, "POST", path, json.dumps(body).encode(), {"Content-Type": "application/json", **headers})


def work_done(app) -> dict:
    """What the daemon has computed and stored: unchanged by a refused request."""
    stats = app.get("/cache/stats")
    return {"counters": stats["counters"], "tokens": stats["tokens"], "disk": stats["disk"]["entries"]}


def assert_refused(path: str, status: int, body: bytes, expected: int, code: str) -> dict:
    assert status == expected, body[:300]
    answer = json.loads(body)
    if path.startswith("/v1/messages"):  # Anthropic's shape
        assert answer["type"] == "error" and answer["error"]["message"]
    else:
        assert answer["error"]["code"] == code and answer["error"]["message"]
    return answer


@pytest.fixture(scope="module")
def open_app(tmp_path_factory, llama_model):
    """The app with another host name, a trusted web origin and previews allowed."""
    from tests.inprocess import InProcessDaemon

    daemon = InProcessDaemon(llama_model, tmp_path_factory.mktemp("open-app") / "cache",
                             "--allowed-hosts", "kvtier.lan", "--allowed-origins", "http://ui.example:3000",
                             "--show-previews").start()
    yield daemon
    daemon.stop()


# -- Host -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method,path,body", ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_a_rebinding_host_is_refused_before_any_work(app_daemon, method, path, body):
    """The page at http://attacker.example:PORT, its name rebound to 127.0.0.1, is the same
    origin as the daemon to the browser: it may send JSON, so only the Host tells it apart."""
    before = work_done(app_daemon)
    host = f"attacker.example:{app_daemon.port}"
    headers = {"Host": host, "Origin": f"http://{host}"} if body else {"Host": host}
    if body:
        headers["Content-Type"] = "application/json"
    status, _, answer = send(app_daemon, method, path, json.dumps(body).encode() if body else None, headers)
    assert_refused(path, status, answer, 403, "host_not_allowed")
    assert work_done(app_daemon) == before


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}", "LOCALHOST.:{port}",
                                  "127.0.0.1", "localhost:9000"])  # no port; a tunnel's port
def test_hosts_naming_the_daemon_are_served(app_daemon, host):
    status, _, body = send(app_daemon, "GET", "/v1/models", headers={"Host": host.format(port=app_daemon.port)})
    assert status == 200, body[:300]


def test_allowed_hosts_adds_names(app_daemon, open_app):
    assert send(open_app, "GET", "/v1/models", headers={"Host": f"kvtier.lan:{open_app.port}"})[0] == 200
    assert send(app_daemon, "GET", "/v1/models", headers={"Host": f"kvtier.lan:{app_daemon.port}"})[0] == 403
    assert send(open_app, "GET", "/v1/models", headers={"Host": f"evil.kvtier.lan:{open_app.port}"})[0] == 403


def test_the_host_check_comes_before_the_api_key(keyed_app):
    """A rebinding page that learned the key is refused all the same; a preflight (which
    carries no key) from the daemon's own origin is answered."""
    key = {"Authorization": "Bearer s3cret"}
    status, _, body = send(keyed_app, "GET", "/cache/entries", headers={"Host": "attacker.example", **key})
    assert_refused("/cache/entries", status, body, 403, "host_not_allowed")
    preflight = {"Origin": keyed_app.url, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization"}
    assert send(keyed_app, "OPTIONS", "/v1/chat/completions", headers=preflight)[0] == 204
    assert send(keyed_app, "GET", "/v1/models", headers={"Origin": keyed_app.url})[0] == 401


def test_bound_to_every_address_ip_hosts_are_served_and_names_need_allowing(app_factory, llama_model):
    """--host 0.0.0.0: clients on the network reach it by any of the machine's addresses,
    which cannot be rebound; a name must be given with --allowed-hosts."""
    app = app_factory(llama_model, "--host", "0.0.0.0", "--api-key", "k", "--allowed-hosts", "box.lan")
    key = {"Authorization": "Bearer k"}
    for host, expected in [("192.168.7.7:8420", 200), ("[fe80::1]:8420", 200), ("box.lan:8420", 200),
                           ("0.0.0.0:8420", 200), ("attacker.example:8420", 403)]:
        assert send(app, "GET", "/v1/models", headers={"Host": host, **key})[0] == expected, host


# -- Origin ---------------------------------------------------------------------------------
@pytest.mark.parametrize("origin", ["http://attacker.example", "http://localhost:3000", "null",
                                    "https://127.0.0.1:{port}"])
def test_a_foreign_origin_is_refused(app_daemon, origin):
    """Another site, another local page (a dev server), a sandboxed frame, another scheme."""
    origin = origin.format(port=app_daemon.port)
    before = work_done(app_daemon)
    status, headers, answer = post_json(app_daemon, "/v1/chat/completions", CHAT, Origin=origin)
    assert_refused("/v1/chat/completions", status, answer, 403, "origin_not_allowed")
    assert "Access-Control-Allow-Origin" not in headers
    status, _, answer = send(app_daemon, "GET", "/cache/entries", headers={"Origin": origin})
    assert_refused("/cache/entries", status, answer, 403, "origin_not_allowed")
    preflight = {"Origin": origin, "Access-Control-Request-Method": "DELETE"}
    assert send(app_daemon, "OPTIONS", "/cache?all=true", headers=preflight)[0] == 403
    assert work_done(app_daemon) == before


def test_the_daemons_own_origin_is_served(app_daemon):
    """Its own pages (a status page) at http://127.0.0.1:PORT or http://localhost:PORT."""
    for origin in (app_daemon.url, f"http://localhost:{app_daemon.port}"):
        status, _, body = post_json(app_daemon, "/v1/chat/completions", CHAT, Origin=origin)
        assert status == 200, body[:300]


def test_an_allowed_origin_gets_cors_answers_and_a_preflight(open_app):
    origin = "http://ui.example:3000"
    status, headers, _ = send(open_app, "OPTIONS", "/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
        "Access-Control-Request-Private-Network": "true"})
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == origin
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Allow-Headers"] == "authorization,content-type"
    assert headers["Access-Control-Allow-Private-Network"] == "true"

    status, headers, body = post_json(open_app, "/v1/chat/completions", dict(CHAT, stream=True), Origin=origin)
    assert status == 200 and b"data: [DONE]" in body  # a stream's headers too
    assert headers["Access-Control-Allow-Origin"] == origin and "Origin" in headers["Vary"]
    status, headers, _ = send(open_app, "GET", "/cache/entries", headers={"Origin": origin})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == origin


# -- Content-Type ---------------------------------------------------------------------------
@pytest.mark.parametrize("content_type,body", [
    ("text/plain", json.dumps(CHAT).encode()),  # a fetch() with a string body sends this
    ("text/plain;charset=UTF-8", json.dumps(CHAT).encode()),
    ("application/x-www-form-urlencoded", b'{"model": "m", "messages": []}='),
    ("multipart/form-data; boundary=x", b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\n{}\r\n--x--\r\n'),
    (None, json.dumps(CHAT).encode()),
], ids=["text", "text-charset", "form", "multipart", "none"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/cache/warm"])
def test_bodies_that_are_not_json_get_415(app_daemon, content_type, body, path):
    """The bodies a page may send cross-site without a preflight never reach a route."""
    before = work_done(app_daemon)
    status, _, answer = send(app_daemon, "POST", path, body, {"Content-Type": content_type} if content_type else {})
    refusal = assert_refused(path, status, answer, 415, "unsupported_media_type")
    assert "Content-Type: application/json" in json.dumps(refusal)
    assert work_done(app_daemon) == before


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON",
                                          "application/vnd.kvtier+json"])
def test_json_content_types_are_served(app_daemon, content_type):
    status, _, body = send(app_daemon, "POST", "/v1/chat/completions", json.dumps(CHAT).encode(),
                           {"Content-Type": content_type})
    assert status == 200, body[:300]


# -- clients, previews, /health -------------------------------------------------------------
def test_the_openai_and_anthropic_clients_still_work(app_daemon):
    chat = app_daemon.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert chat.choices[0].message.content is not None
    claude = anthropic.Anthropic(base_url=app_daemon.url, api_key="unused", max_retries=0, timeout=300)
    message = claude.messages.create(model="m", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].type == "text"


def chat_about_own_text(app) -> None:
    status, _, body = post_json(app, "/v1/chat/completions", dict(CHAT, messages=[
        {"role": "user", "content": f"{OWN_TEXT} " * 40}]))
    assert status == 200, body[:300]


def test_cache_entries_show_no_prompt_text_by_default(app_daemon):
    chat_about_own_text(app_daemon)
    status, _, body = send(app_daemon, "GET", "/cache/entries")
    entries = json.loads(body)["data"]
    assert status == 200 and entries and all("preview" not in e and e["tokens"] and e["key"] for e in entries)
    assert OWN_TEXT.encode() not in body


def test_show_previews_shows_the_prompt_text(open_app):
    chat_about_own_text(open_app)
    shown = json.loads(send(open_app, "GET", "/cache/entries")[2])["data"]
    assert any(OWN_TEXT[:5] in e["preview"] for e in shown)


def test_health_says_who_can_reach_the_daemon(app_daemon):
    assert app_daemon.get("/health")["access"] == {"loopback_only": True, "api_key": False,
                                                   "allowed_hosts": [], "allowed_origins": []}
