"""A client that sends too little, too slowly, or nothing is cut off after the read timeout
(--read-timeout): a body short of its Content-Length gets a 408 in the API's error shape and
the connection is closed; a connection with no complete request (idle, or headers half
sent, or an idle keep-alive one after an answer) is closed. Raw sockets against the app on
127.0.0.1 with a 1 s timeout; each socket's own generous timeout is only the test's guard."""

from __future__ import annotations

import json
import socket

import pytest

from tests.conftest import http_request
from tests.test_bad_input import assert_api_error, body_for

GUARD = 60  # seconds a socket waits before the test fails: the daemon's limit is 1 s
# Less than aiohttp's default lingering (10 s), which held a 408's socket open past the limit.
LINGER_GUARD = 8


@pytest.fixture(scope="module")
def impatient_app(tmp_path_factory, llama_model):
    from tests.inprocess import InProcessDaemon

    daemon = InProcessDaemon(llama_model, tmp_path_factory.mktemp("impatient") / "cache",
                             "--read-timeout", "1").start()
    yield daemon
    daemon.stop()


def connect(app) -> socket.socket:
    return socket.create_connection(("127.0.0.1", app.port), timeout=GUARD)


def read_until_closed(sock: socket.socket) -> bytes:
    """All the daemon sends until it closes the connection (socket.timeout if it never does)."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/messages"])
def test_a_body_short_of_its_length_gets_a_408_and_the_connection_closed(impatient_app, route):
    body = body_for(route, str(impatient_app.model)).encode()
    request = http_request("POST", route, {b"Connection": b"keep-alive",
                                           b"Content-Length": b"%d" % (len(body) + 100)}, body)
    with connect(impatient_app) as sock:
        sock.settimeout(LINGER_GUARD)  # closed soon after the limit, not after aiohttp's lingering
        sock.sendall(request)
        head, _, answer = read_until_closed(sock).partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"408", head
    assert_api_error(route, 408, json.loads(answer), expected=408, words="did not arrive")


@pytest.mark.parametrize("sent", [b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"],
                         ids=["nothing", "half-the-headers"])
def test_a_connection_without_a_whole_request_is_closed(impatient_app, sent):
    with connect(impatient_app) as sock:
        sock.sendall(sent)
        assert read_until_closed(sock) == b""


def test_an_idle_keep_alive_connection_is_closed(impatient_app):
    with connect(impatient_app) as sock:
        sock.sendall(http_request("GET", "/health", {b"Connection": b"keep-alive"}))
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200") and b'"ok"' in answer
    assert impatient_app.get("/health")["status"] == "ok"
