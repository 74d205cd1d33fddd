"""The prefill chunk fit kept across processes (kvtier/chunk_memory.py): a later load of the
same model with the same cache directory recalls it instead of timing the model, and cuts
where the first load did; a damaged or mismatched kept file is measured again; a daemon
measures its on-demand models at start-up, so their first load recalls the fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvtier import chunk_memory, measured
from kvtier.chunking import PrefillChunk
from kvtier.config import CacheConfig
from kvtier.engine import Engine
from tests.conftest import TEST_BLOCK_SIZE


def _load(model: Path, cache_dir: Path, step: int | None = None) -> tuple[PrefillChunk, list[str]]:
    """A load with the probe asked for (`step` None); its chunks and its phases."""
    phases: list[str] = []
    engine = Engine(str(model), CacheConfig(cache_dir=cache_dir, block_size=TEST_BLOCK_SIZE),
                    prefill_step_size=step, progress=phases.append)
    engine.close()
    return engine.prefill_chunk, phases


def _cuts(chunk: PrefillChunk) -> list[int]:
    """Where a 64K-token prompt is cut, from its start."""
    cuts = [0]
    while cuts[-1] < 65536:
        cuts.append(chunk.next_cut(cuts[-1]))
    return cuts


def _kept_fit(cache_dir: Path) -> Path:
    (path,) = [p for p in (cache_dir / measured.DIR_NAME).glob("*.json")
               if json.loads(p.read_text())["key"]["measured"] == "prefill chunk fit"]
    return path


def test_a_second_load_recalls_the_fit_and_cuts_where_the_first_did(tiny_model, tmp_path):
    first, first_phases = _load(tiny_model, tmp_path)
    assert not first.recalled and first.probe_seconds is not None and "timing prefill" in first_phases
    again, phases = _load(tiny_model, tmp_path)
    assert again.recalled and again.probe_seconds is None and "timing prefill" not in phases  # no probe ran
    assert (again.chosen, again.fit, again.sizes, again.tokens, again.tokens_at_reference) == (
        first.chosen, first.fit, first.sizes, first.tokens, first.tokens_at_reference)
    assert _cuts(again) == _cuts(first)
    assert again.describe()["recalled"] is True
    # Another block size: other candidates (and another probe chunk), measured for it.
    other = Engine(str(tiny_model), CacheConfig(cache_dir=tmp_path, block_size=TEST_BLOCK_SIZE * 2),
                   prefill_step_size=None)
    other.close()
    assert not other.prefill_chunk.recalled and other.prefill_chunk.probe_seconds is not None


def test_a_given_size_neither_reads_nor_keeps_a_fit(tiny_model, tmp_path):
    fixed, phases = _load(tiny_model, tmp_path, step=320)
    assert fixed.chosen == "--prefill-step-size" and not (tmp_path / measured.DIR_NAME).exists()
    _load(tiny_model, tmp_path)  # measured and kept
    assert _load(tiny_model, tmp_path, step=320)[0].tokens == 320


@pytest.mark.parametrize("damage", ["cut short", "not a fit", "a negative fit", "another probe"])
def test_a_damaged_or_mismatched_kept_fit_is_measured_again(tiny_model, tmp_path, monkeypatch, damage):
    first, _ = _load(tiny_model, tmp_path)
    kept = _kept_fit(tmp_path)
    content = json.loads(kept.read_text())
    if damage == "cut short":
        kept.write_text(kept.read_text()[:40])
    elif damage == "not a fit":
        kept.write_text(json.dumps(dict(content, value={"tokens": "many", "intercept": None})))
    elif damage == "a negative fit":
        kept.write_text(json.dumps(dict(content, value=dict(content["value"], intercept=-1.0))))
    else:  # the probe changed since: its version is part of the key
        monkeypatch.setattr(chunk_memory, "PROBE_VERSION", chunk_memory.PROBE_VERSION + 1)
    again, phases = _load(tiny_model, tmp_path)
    assert not again.recalled and again.probe_seconds is not None and "timing prefill" in phases
    assert again.chosen == "measured" and again.tokens in again.sizes
    assert _load(tiny_model, tmp_path)[0].recalled  # the new measurement is kept


def test_a_daemon_measures_its_on_demand_models_at_start_up_and_their_first_load_recalls(
        app_factory, tiny_model, llama_model, tmp_path, caplog):
    caplog.set_level("INFO", logger="kvtier")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # no weights: its load fails, at start-up and later
    daemon = app_factory(tiny_model, "--prefill-step-size", "auto", "--model", f"second={llama_model}",
                         "--model", f"broken={broken}")
    second = chunk_memory.FitMemory.of(llama_model, daemon.cache_dir, TEST_BLOCK_SIZE)
    assert second.recall() is not None  # kept before any request for it
    health = daemon.get("/health")
    assert health["prefill_chunk"]["recalled"] is False  # the default measured at its own load
    assert health["models"]["second"]["prefill_chunk"] is None  # not loaded yet
    logged = [r.getMessage() for r in caplog.records]
    measuring = logged.index("measuring the prefill speed of second (first start on this machine)")
    assert measuring < logged.index(f"loading model {tiny_model}")  # before the default model's load
    assert any(line.startswith("could not measure the prefill speed of broken at start-up") for line in logged)

    assert daemon.post("/models/second/load").status == 200
    chunk = daemon.get("/health")["models"]["second"]["prefill_chunk"]
    assert chunk["recalled"] is True and chunk["chosen"] == "measured" and chunk["probe_seconds"] is None
    assert daemon.post("/models/broken/load").status >= 400  # its request gets the usual error


def test_a_daemon_with_a_given_size_measures_nothing_at_start_up(app_factory, tiny_model, llama_model):
    daemon = app_factory(tiny_model, "--model", f"second={llama_model}")  # the tests' --prefill-step-size 2048
    assert daemon.get("/health")["prefill_chunk"]["chosen"] == "--prefill-step-size"
    assert chunk_memory.FitMemory.of(llama_model, daemon.cache_dir, TEST_BLOCK_SIZE).recall() is None
