"""`kvtier models` as a subprocess against a real `kvtier serve` (one model: the subprocess
takes flags only), with an API key: list, unload, load, pin, unpin; a refusal is one line and
exit 1, a daemon that is not running exit 2."""

from __future__ import annotations

import json

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
