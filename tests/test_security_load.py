"""Security defaults, client disconnects, and many concurrent clients, through the daemon's app
served in the test process (tests/inprocess.py); the bind check through `kvtier serve`."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from tests.conftest import ROOT, agent_messages, free_port, http_request

MAX_TOKENS = 8


def test_cache_files_are_private(app_factory, tiny_model):
    daemon = app_factory(tiny_model)  # the files' modes do not depend on the model's size
    daemon.client().chat.completions.create(model=str(daemon.model), messages=agent_messages(),
                                            max_tokens=4, temperature=0)
    daemon.stop()
    assert stat.S_IMODE(daemon.cache_dir.stat().st_mode) == 0o700
    paths = list(daemon.cache_dir.rglob("*"))
    assert any(p.suffix == ".safetensors" for p in paths)
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), path


def test_api_key_is_required_on_every_route(app_factory, llama_model):
    daemon = app_factory(llama_model, "--api-key", "s3cret")
    for path in ("/health", "/v1/models", "/cache/stats", "/metrics"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(daemon.url + path)
        assert err.value.code == 401
        assert json.loads(err.value.read())["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=daemon.url + "/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=daemon.url + "/v1", api_key="s3cret", max_retries=0)
    assert good.models.list().data[0].id == str(llama_model)


def test_non_loopback_bind_needs_an_api_key(llama_model, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "KVTIER_API_KEY"}
    result = subprocess.run([sys.executable, "-m", "daemon.cli", "serve", "--model", str(llama_model),
                             "--host", "0.0.0.0", "--port", str(free_port()), "--cache-dir", str(tmp_path)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--api-key" in result.stderr


def test_no_pickle_anywhere():
    sources = [p for d in ("kvtier", "daemon") for p in (ROOT / d).rglob("*.py")]
    assert sources and not [p for p in sources if re.search(r"^\s*(import|from)\s+(c?pickle|dill)\b",
                                                            p.read_text(), re.M)]


def test_client_disconnect_stops_generation_and_frees_the_worker(app_factory, llama_model, reference):
    daemon = app_factory(llama_model, ceiling=None)  # the answer outlasts its client
    body = json.dumps({"model": str(daemon.model), "messages": agent_messages(question="Ramble."),
                       "max_tokens": 5000, "temperature": 0, "stream": True})
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=120)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    response.readline()  # the first event: generation has started
    conn.sock.close()
    conn.close()
    messages = agent_messages(question="Next request.")
    text = daemon.client().chat.completions.create(model=str(daemon.model), messages=messages,
                                                   max_tokens=MAX_TOKENS, temperature=0).choices[0].message.content
    assert text == reference.chat(messages, MAX_TOKENS)
    assert daemon.get("/cache/stats")["counters"].get("requests_cancelled") == 1


def _counters(daemon) -> dict:
    return daemon.get("/cache/stats")["counters"]


def test_non_streaming_client_disconnect_cancels_generation(app_factory, llama_model, reference):
    daemon = app_factory(llama_model, ceiling=None)  # the answer outlasts its client
    before = _counters(daemon)
    started = before.get("requests_hit", 0) + before.get("requests_miss", 0)
    body = json.dumps({"model": str(daemon.model), "max_tokens": 5000, "temperature": 0,
                       "messages": agent_messages(question="Ramble without streaming.")}).encode()
    conn = socket.create_connection(("127.0.0.1", daemon.port))
    conn.sendall(http_request("POST", "/v1/chat/completions", body=body))
    for _ in range(1200):  # until the worker has begun this request (it counts it as hit or miss)
        now = _counters(daemon)
        if now.get("requests_hit", 0) + now.get("requests_miss", 0) > started:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the request never started")
    conn.close()
    messages = agent_messages(question="Next request.")
    text = daemon.client().chat.completions.create(
        model=str(daemon.model), messages=messages, max_tokens=8, temperature=0).choices[0].message.content
    assert text == reference.chat(messages, 8)
    after = _counters(daemon)
    assert after.get("requests_cancelled", 0) == before.get("requests_cancelled", 0) + 1


def _run_clients(daemon, jobs):
    results: list[str | openai.APIStatusError | None] = [None] * len(jobs)

    def run(i, messages, stream):
        client = daemon.client()
        try:
            if stream:
                parts = client.chat.completions.create(model=str(daemon.model), messages=messages,
                                                       max_tokens=MAX_TOKENS, temperature=0, stream=True)
                results[i] = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
            else:
                results[i] = client.chat.completions.create(
                    model=str(daemon.model), messages=messages, max_tokens=MAX_TOKENS,
                    temperature=0).choices[0].message.content
        except openai.APIStatusError as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, m, s)) for i, (m, s) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return results


def test_concurrent_clients_all_get_exact_answers(app_factory, llama_model, reference):
    daemon = app_factory(llama_model)
    prompts = [agent_messages("shared", question=f"Question {i}.") for i in range(4)] + \
              [agent_messages(f"distinct-{i}") for i in range(4)]
    jobs = [(m, i % 2 == 0) for i, m in enumerate(prompts)]
    results = _run_clients(daemon, jobs)
    assert results == [reference.chat(m, MAX_TOKENS) for m, _ in jobs]


def test_overload_answers_503_with_retry_after(app_factory, llama_model, reference):
    daemon = app_factory(llama_model, "--max-waiting", "1")
    jobs = [(agent_messages(f"load-{i}"), False) for i in range(6)]
    results = _run_clients(daemon, jobs)
    refused = [r for r in results if isinstance(r, openai.APIStatusError)]
    served = [(r, m) for r, (m, _) in zip(results, jobs) if isinstance(r, str)]
    assert refused and served
    assert all(r.status_code == 503 and r.response.headers["Retry-After"] for r in refused)
    assert all(text == reference.chat(m, MAX_TOKENS) for text, m in served)
    assert daemon.get("/health")["status"] == "ok"


def test_oversized_body_is_rejected_with_413(app_daemon):
    body = b'{"model": "x", "prompt": "' + b"a" * (33 * 2**20) + b'"}'
    request = urllib.request.Request(app_daemon.url + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=120)
    assert err.value.code == 413 and "error" in json.loads(err.value.read())
    assert app_daemon.get("/health")["status"] == "ok"


def test_bounded_soak_with_a_small_ram_budget(app_factory, llama_model, reference):
    """Rounds of concurrent, repeated and new prompts: every answer exact, the hot tier within
    budget, the queue drained, the daemon healthy at the end."""
    budget = 4_000_000
    daemon = app_factory(llama_model, "--ram-budget", str(budget))
    for round_ in range(3):  # each round's 4 prompts are ~5 MB of KV each: past the budget every round
        jobs = [(agent_messages(f"soak-{(round_ + i) % 5}", question=f"Step {round_}."), i % 2 == 0)
                for i in range(4)]
        assert _run_clients(daemon, jobs) == [reference.chat(m, MAX_TOKENS) for m, _ in jobs]
        stats = daemon.get("/cache/stats")
        assert stats["ram"]["bytes"] - stats["ram"]["pending_bytes"] <= budget  # beyond: being written
    health = daemon.get("/health")
    assert health["status"] == "ok" and health["waiting_requests"] == 0
    assert stats["hits"] > 0
