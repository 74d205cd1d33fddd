"""What a load measures that depends only on the model and the machine (kvtier/measured.py):
the batched-decode probe's verdict is kept in the cache directory, so a restart recalls it
instead of measuring again, and a changed key (here the model's fingerprint) measures again."""

from __future__ import annotations

import json

from kvtier import measured
from kvtier.exactness import PROBE_VERSION


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
