"""Operating several models (issue 31): /v1/models with each model's state and sizes, /health,
/cache/stats and /metrics per model, and the routes that load, unload and pin a model by
name, on the daemon's app with two generated models ("tiny", the default, and "llama")."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.state import STATE
from kvtier.config import ModelSpec, ServeConfig
from kvtier.models_memory import weights_on_disk
from tests.conftest import agent_messages
from tests.inprocess import InProcessDaemon


@pytest.fixture(scope="module")
def two(tmp_path_factory, tiny_model, llama_model):
    def configure(config: ServeConfig) -> None:
        config.models = [ModelSpec(str(tiny_model), name="tiny"),
                         ModelSpec(str(llama_model), name="llama", aliases=["big"])]

    daemon = InProcessDaemon(tiny_model, tmp_path_factory.mktemp("ops") / "cache", configure=configure).start()
    yield daemon
    daemon.stop()


def ask(daemon, model: str, project: str = "ops", max_tokens: int = 4) -> None:
    daemon.client().chat.completions.create(model=model, messages=agent_messages(project, repeat=2),
                                            max_tokens=max_tokens, temperature=0)


def act(daemon, name: str, action: str):
    return daemon.post(f"/models/{name}/{action}")


def settled(daemon, loaded: str) -> None:
    """Wait out the batched-decode probe that a load on demand leaves to the daemon's idle time:
    it holds the MLX thread for a second or more on a busy machine, and a poll's job queued
    meanwhile would be waiting. A no-op job on `loaded` (a loaded model) runs after it."""
    worker = daemon.app[STATE].worker
    for _ in range(1200):
        if not any(m.measure_when_idle for m in worker.models.values()):
            break
        time.sleep(0.05)
    daemon._run(worker.call(lambda engine: None, loaded))


def listed(daemon) -> dict:
    return {m.id: m.model_extra for m in daemon.client().models.list().data}


def test_v1_models_lists_every_model_and_alias_with_its_state_and_sizes(two, llama_model, tiny_model):
    assert act(two, "llama", "unload").status == 200
    models = listed(two)
    assert list(models) == ["tiny", "llama", "big"]
    assert models["tiny"]["state"] == "loaded" and models["tiny"]["hot_bytes"] >= 0
    assert models["tiny"]["weight_bytes"] > 0
    assert models["llama"] == models["big"] == {"state": "unloaded", "hot_bytes": 0,
                                                "weight_bytes": weights_on_disk(llama_model)}
    ask(two, "big")
    models = listed(two)
    assert models["llama"]["state"] == models["big"]["state"] == "loaded"
    assert models["llama"]["hot_bytes"] > 0  # its prompt's blocks are in RAM


def test_health_keeps_the_default_models_fields_and_adds_every_model(two):
    ask(two, "llama")
    health = two.get("/health")
    assert health["status"] == "ok" and health["model"] == "tiny" and health["model_state"] == "loaded"
    assert health["batching"]["mode"] and "disk_writable" in health and "prefill_chunk" in health
    assert set(health["models"]) == {"tiny", "llama"}
    llama = health["models"]["llama"]
    assert llama["state"] == "loaded" and llama["loads"] >= 1 and llama["load_seconds"] > 0
    assert llama["aliases"] == ["big"] and llama["batching"]["mode"] and not llama["default"]
    assert act(two, "llama", "unload").status == 200
    health = two.get("/health")
    assert health["status"] == "ok" and health["models"]["llama"]["state"] == "unloaded"
    assert act(two, "llama", "load").status == 200
    assert act(two, "tiny", "unload").status == 200  # the default unloaded: a request loads it again
    health = two.get("/health")
    assert health["status"] == "ok" and health["model_state"] == "unloaded"
    settled(two, "llama")
    assert two.get("/status")["waiting"] == 0  # the status page's data, with its model unloaded
    assert two.get("/cache/stats")["state"] == "unloaded"
    assert two.get("/cache/entries")["data"]  # read through llama's store
    assert act(two, "default", "load").json()["state"] == "loaded"


def test_cache_stats_per_model_does_not_load_an_unloaded_one(two):
    ask(two, "llama", "stats")
    loaded = two.get("/cache/stats?model=big")
    assert loaded["model"] == "llama" and loaded["state"] == "loaded"
    assert loaded["hits"] + loaded["misses"] >= 1
    assert two.get("/cache/stats")["model"] == "tiny"  # the default, without the parameter
    assert act(two, "llama", "unload").status == 200
    unloaded = two.get("/cache/stats?model=llama")
    assert unloaded["state"] == "unloaded" and unloaded["fingerprint"] == loaded["fingerprint"]
    assert unloaded["on_disk"]["blocks"] > 0 and unloaded["on_disk"]["requests"] >= 1
    assert listed(two)["llama"]["state"] == "unloaded"  # still: reporting did not load it
    missing = two.request("GET", "/cache/stats?model=nope")
    assert missing.status == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_metrics_label_every_models_series_with_each_help_and_type_once(two):
    ask(two, "tiny", "metrics")
    ask(two, "llama", "metrics")
    text = two.request("GET", "/metrics").text
    declared = Counter(line.split()[2] for line in text.splitlines() if line.startswith(("# HELP", "# TYPE")))
    assert declared and max(declared.values()) == 2  # one HELP and one TYPE per family
    families = {f.name: f for f in text_string_to_metric_families(text)}
    loaded = {s.labels["model"]: s.value for s in families["kvtier_model_loaded"].samples}
    assert loaded == {"tiny": 1, "llama": 1}
    assert {s.labels["model"] for s in families["kvtier_model_loads"].samples} == {"tiny", "llama"}
    assert all(s.value > 0 for s in families["kvtier_model_weight_bytes"].samples)
    requests: dict[str, float] = {"tiny": 0.0, "llama": 0.0}
    for sample in families["kvtier_requests"].samples:
        if sample.name == "kvtier_requests_total":  # by result: hit, miss
            requests[sample.labels["model"]] += sample.value
    assert requests["tiny"] >= 1 and requests["llama"] >= 1
    assert {s.labels["model"] for s in families["kvtier_decode_tokens"].samples} == {"tiny", "llama"}
    assert "model" not in families["kvtier_disk_bytes"].samples[0].labels  # the cache directory's
    assert act(two, "llama", "unload").status == 200
    families = {f.name: f for f in text_string_to_metric_families(two.request("GET", "/metrics").text)}
    assert {s.labels["model"]: s.value for s in families["kvtier_model_loaded"].samples} == {"tiny": 1, "llama": 0}
    states = {s.labels["state"] for s in families["kvtier_model_state"].samples
              if s.labels["model"] == "llama" and s.value == 1}
    assert states == {"unloaded"}


def test_load_pin_unpin_and_unload_a_model_by_name(two):
    act(two, "llama", "unload")
    loaded = act(two, "big", "load")
    assert loaded.status == 200 and loaded.json()["name"] == "llama" and loaded.json()["state"] == "loaded"
    pinned = act(two, "llama", "pin").json()
    assert pinned["pinned"] and pinned["state"] == "loaded"
    assert act(two, "llama", "unpin").json()["pinned"] is False
    unloaded = act(two, "llama", "unload")
    assert unloaded.status == 200 and unloaded.json()["state"] == "unloaded"
    assert act(two, "llama", "unload").json()["state"] == "unloaded"  # again: nothing to do
    assert act(two, "llama", "pin").json()["state"] == "loaded"  # pinning loads it
    act(two, "llama", "unpin")
    for action in ("load", "unload", "pin", "unpin"):
        missing = act(two, "claude-3-haiku", action)  # never the default model here
        assert missing.status == 404, action
        assert missing.json()["error"]["code"] == "model_not_found"


def test_unloading_a_model_that_serves_a_request_is_a_409_and_the_answer_completes(two):
    act(two, "llama", "load")
    started, done = threading.Event(), threading.Event()

    def stream() -> str:
        events = two.client().chat.completions.create(model="llama", messages=agent_messages("busy", repeat=1),
                                                      max_tokens=200, temperature=0, stream=True)
        pieces: list[str] = []
        for event in events:
            started.set()
            pieces.extend(c.delta.content or "" for c in event.choices)
        done.set()
        return "".join(pieces)

    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(stream)
        assert started.wait(120)
        busy = act(two, "llama", "unload")
        finished_first = done.is_set()
        assert answer.result(300)
    if finished_first:
        pytest.skip("the stream ended before the unload was asked for")
    assert busy.status == 409, busy.text
    assert busy.json()["error"]["code"] == "model_busy" and busy.json()["error"]["type"] == "invalid_request_error"
    assert listed(two)["llama"]["state"] == "loaded"


def test_the_model_routes_need_the_api_key(tmp_path, tiny_model):
    daemon = InProcessDaemon(tiny_model, tmp_path / "cache", "--api-key", "s3cret").start()
    try:
        name = str(tiny_model)
        refused = daemon.request("POST", "/models/default/unload")
        assert refused.status == 401
        assert daemon.get("/models")["data"][0]["state"] == "loaded"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=daemon.url + "/v1", api_key="wrong", max_retries=0).models.list()
        keyed = daemon.request("POST", "/models/default/unload", headers={"Authorization": "Bearer s3cret"})
        assert keyed.status == 200 and keyed.json()["name"] == name and keyed.json()["state"] == "unloaded"
    finally:
        daemon.stop()


def test_purging_one_model_by_its_name_leaves_the_others(two):
    ask(two, "tiny", "purge one")
    ask(two, "llama", "purge one")
    fingerprints = {m: two.get(f"/cache/stats?model={m}")["fingerprint"] for m in ("tiny", "llama")}
    two.get("/cache/entries")  # waits for the writes
    reply = two.request("DELETE", "/cache?model=big")  # llama's alias
    assert reply.status == 200 and list(reply.json()["models"]) == [fingerprints["llama"]], reply.text
    left = {entry["fingerprint"] for entry in two.get("/cache/entries")["data"]}
    assert left == {fingerprints["tiny"]}
    assert two.get("/cache/stats?model=llama")["ram"]["entries"] == 0


def test_purging_everything_drops_every_loaded_models_hot_copies(two):
    """Last in the module: it empties the cache."""
    ask(two, "tiny", "purge")
    ask(two, "llama", "purge")
    assert two.get("/cache/stats?model=llama")["ram"]["entries"] > 0
    assert two.request("DELETE", "/cache?all=true").status == 200
    for model in ("tiny", "llama"):
        stats = two.get(f"/cache/stats?model={model}")
        assert stats["ram"]["entries"] == 0 and stats["live"]["entries"] == 0, model
    assert two.get("/cache/entries")["data"] == []
