"""What a load measures that depends only on the model and the machine (kvtier/measured.py):
the batched-decode probe's verdict is kept in the cache directory, so a restart recalls it
instead of measuring again, and a changed key (here the model's fingerprint) measures again;
a load a request waits for leaves the probe to the daemon's idle time."""

from __future__ import annotations

import json
import time

from kvtier import measured
from kvtier.exactness import PROBE_VERSION
from tests.conftest import Reference, agent_messages


def test_a_value_is_recalled_under_its_exact_key_only(tmp_path):
    key = {"measured": "a test", "probe": PROBE_VERSION, **measured.machine()}
    assert measured.recall(tmp_path, key) is None
    measured.remember(tmp_path, key, {"exact": False, "max_difference": 6.5e-05})
    assert measured.recall(tmp_path, key) == {"exact": False, "max_difference": 6.5e-05}
    assert measured.recall(tmp_path, dict(key, mlx="0.0.1")) is None  # another mlx: measured again
    assert measured.recall(tmp_path, dict(key, probe=PROBE_VERSION + 1)) is None


def test_a_damaged_or_foreign_file_is_a_miss(tmp_path):
    key = {"measured": "damaged"}
    measured.remember(tmp_path, key, {"value": 1})
    (kept,) = (tmp_path / measured.DIR_NAME).iterdir()
    kept.write_text('{"key": {"measured": "dam')  # a write cut short
    assert measured.recall(tmp_path, key) is None
    kept.write_text(json.dumps({"key": {"measured": "other"}, "value": {"value": 2}}))  # not its key
    assert measured.recall(tmp_path, key) is None
    (tmp_path / "file").write_text("")
    measured.remember(tmp_path / "file", key, {"value": 3})  # no directory there: kept nowhere, no error
    assert measured.recall(tmp_path / "file", key) is None


def test_a_restart_recalls_the_batched_decode_verdict_and_a_changed_fingerprint_measures_it(app_factory,
                                                                                         tiny_model, tmp_path):
    cache = tmp_path / "kept"
    first = app_factory(tiny_model, "--max-batch", "4", cache_dir=cache)
    measured_now = first.get("/health")["batching"]
    first.stop()
    assert "recalled" not in measured_now["reason"]
    again = app_factory(tiny_model, "--max-batch", "4", cache_dir=cache).get("/health")["batching"]
    assert again["reason"] == measured_now["reason"] + " (recalled: measured at an earlier load)"
    assert (again["mode"], again["max_logprob_difference"]) == (measured_now["mode"],
                                                                 measured_now["max_logprob_difference"])
    # Another block size is another fingerprint (the KV's layout): its verdict is measured.
    other = app_factory(tiny_model, "--max-batch", "4", "--block-size", "32", cache_dir=cache)
    assert "recalled" not in other.get("/health")["batching"]["reason"]


def test_a_model_loaded_for_a_waiting_request_measures_batching_once_the_daemon_is_idle(
        app_factory, tiny_model, llama_model, caplog):
    """Without --exact the probe's verdict does not change how requests run where mlx-lm can
    batch: a load a request waits for leaves it to the idle time after the answer. The route
    submits its request a few ms after the load: it is admitted before the probe's first
    piece (daemon/worker.py QUIET_SECONDS), not after one."""
    caplog.set_level("DEBUG", logger="kvtier.worker")
    daemon = app_factory(tiny_model, "--max-batch", "4", "--model", f"second={llama_model}")
    messages = agent_messages("measured later", repeat=1)
    answer = daemon.client().chat.completions.create(model="second", messages=messages, max_tokens=8,
                                                     temperature=0).choices[0].message.content
    deadline = time.monotonic() + 120
    while (batching := daemon.get("/health")["models"]["second"]["batching"])["max_logprob_difference"] is None:
        assert time.monotonic() < deadline, batching
        time.sleep(0.1)
    assert batching["mode"] == "batched" and "recalled" not in batching["reason"]
    logged = [r.getMessage() for r in caplog.records if r.name == "kvtier.worker"]
    left = logged.index("second: continuous batching on, up to 4 requests; batched decode is measured once "
                        "the daemon is idle")
    loaded = next(i for i, line in enumerate(logged) if line.startswith("model second loaded"))
    measured_at = next(i for i, line in enumerate(logged) if line.startswith("second: batched decode measured while idle"))
    assert left < loaded < measured_at  # not measured on the load the request waited for: after it
    admitted = next(i for i, line in enumerate(logged) if line.startswith("second: a request of"))
    first_piece = logged.index("second: a piece of the batched-decode probe")
    assert loaded < admitted < first_piece
    assert answer == Reference(llama_model).chat(messages, 8)


def test_the_probe_runs_in_pieces_that_requests_may_come_between(llama_model, tmp_path):
    """The idle-time probe yields after each prompt it decodes alone: a request served
    between two pieces is answered as plain mlx-lm answers it, and the verdict is the one
    the probe gives when run whole."""
    from kvtier.config import CacheConfig
    from kvtier.engine import Engine
    from kvtier.exactness import measure_exactness, measuring
    from kvtier.requests import GenerationRequest
    from kvtier.scheduler import generate

    engine = Engine(str(llama_model), CacheConfig(cache_dir=tmp_path, block_size=64), prefill_step_size=64)
    whole = measure_exactness(engine)
    messages = agent_messages("between pieces", repeat=1)
    request = GenerationRequest(engine.renderer.render(messages, None)[0], max_tokens=8, temperature=0.0)
    probe, pieces, answer = measuring(engine), 0, None
    while True:
        try:
            next(probe)
        except StopIteration as done:
            verdict = done.value
            break
        pieces += 1
        if pieces == 2:
            answer = "".join(chunk.text for chunk in generate(engine, request))
    # One a prompt decoded alone; the batch and the verdict after the last (and, where the
    # batch differs, one more before the batch that computes the prompts themselves).
    assert pieces == (3 if verdict.exact else 4)
    assert (verdict.exact, verdict.reason, verdict.max_difference) == (whole.exact, whole.reason,
                                                                       whole.max_difference)
    assert answer == Reference(llama_model).chat(messages, 8)
