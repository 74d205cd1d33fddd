"""Operating the daemon over HTTP (its app served in the test process, tests/inprocess.py):
entries, purge, warm, metrics; budgets held under load; memory pressure spills to disk without
losing anything."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TEST_BLOCK_SIZE, agent_messages

MAX_TOKENS = 8


def request(daemon, method: str, path: str, body: dict | None = None) -> tuple[int, Any]:  # the JSON answer, or its text
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(daemon.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            raw = r.read().decode()
            return r.status, json.loads(raw) if r.headers["Content-Type"].startswith("application/json") else raw
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def ask(daemon, messages):
    response = daemon.client().chat.completions.create(
        model=str(daemon.model), messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    return response.choices[0].message.content, response.usage


def dir_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def test_entries_purge_warm_and_metrics_over_http(app_factory, tiny_model, tiny_reference):
    """On the tiny model: what the routes answer does not depend on the model's size."""
    reference = tiny_reference
    daemon = app_factory(tiny_model)
    ask(daemon, agent_messages("alpha"))
    status, entries = request(daemon, "GET", "/cache/entries")
    assert status == 200 and len(entries["data"]) == 1
    assert entries["data"][0]["tier"] == "ram+disk" and entries["data"][0]["tokens"] > TEST_BLOCK_SIZE
    assert request(daemon, "GET", "/cache/entries?limit=1")[1]["data"] == entries["data"]
    assert request(daemon, "GET", "/cache/entries?offset=1")[1]["data"] == []  # the next page: empty
    status, error = request(daemon, "GET", "/cache/entries?limit=-1")
    assert status == 400 and error["error"]["param"] == "limit"

    status, metrics = request(daemon, "GET", "/metrics")
    assert status == 200
    model = f'model="{daemon.model}"'  # every model's series are labelled with its name
    assert f'kvtier_requests_total{{{model},result="miss"}} 1' in metrics
    assert "# TYPE kvtier_ram_bytes gauge" in metrics
    assert f"kvtier_ram_pending_bytes{{{model}}} 0" in metrics  # /cache/entries waited for the writer
    with urllib.request.urlopen(daemon.url + "/metrics") as r:  # what Prometheus reads
        assert r.headers["Content-Type"] == CONTENT_TYPE_LATEST
        families = {family.name: family for family in text_string_to_metric_families(r.read().decode())}
    assert families["kvtier_requests"].type == "counter" and families["kvtier_ram_bytes"].type == "gauge"
    assert {s.labels["source"] for s in families["kvtier_prompt_tokens"].samples} == {"ram", "disk", "shared", "computed"}

    assert request(daemon, "DELETE", "/cache")[0] == 400
    assert request(daemon, "DELETE", "/cache?older_than=soon")[0] == 400
    status, result = request(daemon, "DELETE", "/cache?all=true")
    assert status == 200 and result["entries"] == 0
    assert daemon.get("/cache/stats")["ram"]["blocks"] == 0

    messages = agent_messages("omega", question="Go.")
    status, warmed = request(daemon, "POST", "/cache/warm", {"messages": messages[:1], "pin": True})
    assert status == 200 and warmed["pinned_entries"] > 0
    text, usage = ask(daemon, messages)
    assert text == reference.chat(messages, MAX_TOKENS)
    assert usage.prompt_tokens_details.cached_tokens >= warmed["tokens"] - 8
    status, result = request(daemon, "DELETE", "/cache?to_size=0")
    assert result["entries"] > 0  # the warmed prefix is pinned


def test_budgets_hold_well_past_tiny_limits_and_outputs_stay_exact(app_factory, llama_model, reference):
    ram_budget, disk_budget = 3_000_000, 8_000_000  # a few blocks each
    daemon = app_factory(llama_model, "--ram-budget", str(ram_budget), "--disk-budget", str(disk_budget))
    projects = [f"project-{i}" for i in range(5)]
    for project in projects:  # ~5 x 0.7K tokens x 8 KB/token: several times both budgets
        messages = agent_messages(project)
        assert ask(daemon, messages)[0] == reference.chat(messages, MAX_TOKENS)
        stats = daemon.get("/cache/stats")
        assert stats["ram"]["bytes"] - stats["ram"]["pending_bytes"] <= ram_budget  # beyond: being written
        assert dir_bytes(daemon.cache_dir) <= disk_budget
    assert stats["counters"]["disk_evictions"] > 0
    # The oldest project was evicted; it is recomputed, still exactly.
    messages = agent_messages(projects[0])
    assert ask(daemon, messages)[0] == reference.chat(messages, MAX_TOKENS)
    daemon.stop()
    assert dir_bytes(daemon.cache_dir) <= disk_budget


def test_memory_pressure_spills_to_disk_and_loses_nothing(app_factory, tiny_model, tiny_reference):
    # "Pressure" whenever less than a petabyte is free: always, on this machine. The tiny
    # model: a spill does not depend on the model's size.
    reference = tiny_reference
    daemon = app_factory(tiny_model, "--pressure-below", "1000TB", "--pressure-keep", "0")
    messages = agent_messages("pressure")
    expected = reference.chat(messages, MAX_TOKENS)
    assert ask(daemon, messages)[0] == expected
    deadline = time.time() + 30
    while time.time() < deadline:
        stats = daemon.get("/cache/stats")
        spilled = stats["counters"].get("memory_pressure_events") and stats["ram"]["bytes"] == 0
        if spilled and stats["disk"]["blocks"] > 0:  # and the queued writes have landed
            break
        time.sleep(0.2)
    assert stats["ram"]["bytes"] == 0 and stats["disk"]["blocks"] > 0
    text, usage = ask(daemon, messages)
    assert text == expected
    assert usage.model_extra["kvtier"]["disk_tokens"] > 0  # spilled, not dropped
