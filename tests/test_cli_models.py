"""`kvtier models` as a subprocess against a real `kvtier serve` (one model: the subprocess
takes flags only), with an API key: list, unload, load, pin, unpin; a refusal is one line and
exit 1, a daemon that is not running exit 2."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import free_port
from tests.test_cli import kvtier

KEY = {"KVTIER_API_KEY": "s3cret"}


def models(url: str, *args: str):
    return kvtier("models", *args, "--url", url, env=KEY)


def test_models_list_load_unload_pin_against_a_running_daemon(daemon_factory, tiny_model):
    daemon = daemon_factory(tiny_model, "--api-key", "s3cret")
    name = str(tiny_model)
    listing = models(daemon.url)  # list is the default action
    assert listing.returncode == 0, listing.stderr
    header, row = listing.stdout.splitlines()[:2]
    assert header.split() == ["NAME", "STATE", "WEIGHTS", "HOT", "KV", "LOADS", "LAST", "LOAD"]
    assert row.startswith(f"{name} (default)") and " loaded " in row and "MiB" in row and " s" in row

    unloaded = models(daemon.url, "unload", "default")
    assert unloaded.returncode == 0, unloaded.stderr
    assert unloaded.stdout.strip().startswith(f"{name}: unloaded (weights ")
    data = json.loads(models(daemon.url, "list", "--json").stdout)
    assert [(m["name"], m["state"], m["loads"]) for m in data] == [(name, "unloaded", 1)]

    loaded = models(daemon.url, "load", tiny_model.name)  # its directory name
    assert loaded.returncode == 0 and f"{name}: loaded" in loaded.stdout
    pinned = models(daemon.url, "pin", name)
    assert pinned.returncode == 0 and "loaded, pinned" in pinned.stdout
    assert "pinned" not in models(daemon.url, "unpin", name).stdout
    assert json.loads(models(daemon.url, "--json").stdout)[0]["loads"] == 2

    unknown = models(daemon.url, "load", "no-such-model")
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert unknown.stderr.count("\n") == 1 and "no model 'no-such-model'" in unknown.stderr
    assert "HTTP 404" in unknown.stderr
    no_key = kvtier("models", "list", "--url", daemon.url, env={"KVTIER_API_KEY": ""})
    assert no_key.returncode == 1 and "HTTP 401" in no_key.stderr
    missing_name = models(daemon.url, "unload")
    assert missing_name.returncode == 1 and "give the model's name" in missing_name.stderr


def test_models_with_no_daemon_running_exits_2():
    result = kvtier("models", "list", "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2 and result.stderr.startswith("kvtier: no daemon is running at")
    assert result.stderr.count("\n") == 1


def test_models_of_a_daemon_serving_two(daemon_factory, tiny_model, llama_model):
    daemon = daemon_factory(f"tiny={tiny_model}", "--model", f"llama={llama_model}", "--api-key", "s3cret")
    rows = models(daemon.url).stdout.splitlines()[1:]
    assert rows[0].split()[:3] == ["tiny", "(default)", "loaded"] and rows[1].split()[:2] == ["llama", "unloaded"]
    assert rows[1].split()[-1] == "-"  # never loaded: no last load
    loaded = models(daemon.url, "load", "llama")
    assert loaded.returncode == 0 and loaded.stdout.startswith("llama: loaded"), loaded.stderr
    data = {m["name"]: m for m in json.loads(models(daemon.url, "--json").stdout)}
    assert data["tiny"]["state"] == data["llama"]["state"] == "loaded" and data["llama"]["loads"] == 1
    assert models(daemon.url, "unload", "llama").stdout.startswith("llama: unloaded")
    assert models(daemon.url, "unload", "llama").returncode == 0  # already: nothing to do


def test_models_takes_an_openai_base_url(daemon_factory, tiny_model):
    """OPENAI_BASE_URL users have .../v1: it names the daemon too (its /v1/models is OpenAI's list)."""
    daemon = daemon_factory(tiny_model, "--api-key", "s3cret")
    plain = models(daemon.url, "--json")
    assert plain.returncode == 0, plain.stderr
    for url in (f"{daemon.url}/v1", f"{daemon.url}/v1/"):
        listed = models(url, "--json")
        assert listed.returncode == 0, listed.stderr
        assert [m["name"] for m in json.loads(listed.stdout)] == [str(tiny_model)]


class OtherServer(BaseHTTPRequestHandler):
    """Not kvtier: an OpenAI-style server, or a web page, at the URL given."""
    answers = {"/models": b'{"object": "list", "data": [{"id": "m", "object": "model"}]}',
               "/page/models": b"<html>not json</html>", "/dict/models": b'{"data": {"name": "m"}}',
               "/page/models/m/load": b'{"id": "m"}'}

    def do_GET(self):
        self._answer()

    def do_POST(self):
        self._answer()

    def _answer(self):
        body = self.answers[self.path]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def other_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), OtherServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("path, args, reason", [
    ("/v1", ("list",), "a model without name, state"), ("/page", ("list",), "GET /models did not answer JSON"),
    ("/dict", ("list",), "GET /models gave no list of models"), ("/page", ("load", "m"), "a model without name")])
def test_models_of_a_server_that_is_not_kvtier_is_one_line_and_exit_2(other_server, path, args, reason):
    result = models(other_server + path, *args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"kvtier: {other_server + path} does not answer as a kvtier daemon (")
    assert reason in result.stderr and result.stderr.count("\n") == 1, result.stderr
