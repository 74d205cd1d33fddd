"""bench/parallel.py stays runnable: its report turns a run's numbers into issue 33's targets
(pass/fail), the docs section and the plot, from a saved parallel.json as from a run."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT


@pytest.fixture
def report(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # the benches import each other by name
    import parallel_report

    return parallel_report


def _server(decode: dict, shared4: list[float], stall: float, alone: float, beside: float) -> dict:
    return {"decode": {k: [v] for k, v in decode.items()}, "single": [decode["1"]],
            "agents": {"shared": {"4": shared4}, "distinct": {"4": [w * 2 for w in shared4]}},
            "cold": [{"longest_stall": stall, "ttft_alone": alone, "ttft_beside": beside, "decoders_ran_through": True}]}


def _results() -> dict:
    """A run where kvtier meets every target and a second configuration misses them all."""
    results: dict = {"date": "2026-12-07 10:00", "machine": "test machine", "command": "python bench/parallel.py --quick",
            "model_name": "llama h256 x4", "load": {"start": "1.00", "end": "2.00"}, "seconds": 300.0,
            "ns": [1, 4, 8], "agent_ns": [4], "decode_tokens": 64, "single_tokens": 256, "trials": 1, "rounds": 3, "agent_tokens": 24,
            "system_tokens": 1024, "cold_tokens": 4096, "decoders": 2, "plain_decode": [100.0],
            "servers": {
                "kvtier": _server({"1": 99.0, "4": 210.0, "8": 310.0}, [1.0, 0.5, 0.5], 0.4, 5.0, 5.5),
                "kvtier --exact": _server({"1": 90.0, "4": 110.0, "8": 108.0}, [2.0, 1.0, 1.0], 3.5, 5.0, 7.0),
                "mlx_lm.server": _server({"1": 92.0, "4": 200.0, "8": 300.0}, [2.0, 1.0, 1.0], 3.4, 6.0, 7.0),
            }}
    results["servers"]["kvtier"]["health"] = {"batching": {"mode": "batched", "reason": "measured"},
                                              "prefill_chunk": {"tokens": 256, "chosen": "measured"}}
    return results


def test_each_target_passes_or_fails_on_the_numbers(report):
    results = _results()
    lines = report.targets(results)
    by_server: dict[str, list[str]] = {}
    for line in lines:
        by_server.setdefault(line["server"], []).append(line["result"])
    assert set(by_server) == {"kvtier", "kvtier --exact"}  # the peer is what they are measured against
    assert by_server["kvtier"] == ["pass"] * 6
    assert by_server["kvtier --exact"] == ["FAIL"] * 6
    agents = next(t for t in lines if t["server"] == "kvtier" and t["target"].startswith("agents"))
    assert agents["measured"] == pytest.approx(2.0 / 4.0)
    printed = report.target_lines(lines)
    assert len(printed) == 12 and printed[0].startswith("PASS kvtier: aggregate decode at N = 4")


def test_the_section_and_the_plot_come_from_a_saved_run(report, tmp_path):
    results = json.loads(json.dumps(_results()))
    results["targets"] = report.targets(results)
    section = report.render(results)
    assert "python bench/parallel.py --quick" in section and "| kvtier --exact |" in section
    assert "- kvtier: batching `batched` (measured); prefill chunks of 256 tokens (measured)" in section
    assert section.count("| FAIL |") == 6
    pytest.importorskip("matplotlib")
    report.plot(results, tmp_path / "parallel.png")
    assert (tmp_path / "parallel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_missing_measurement_is_no_target_met(report):
    results = _results()
    del results["servers"]["mlx_lm.server"]["decode"]["8"]
    line = next(t for t in report.targets(results) if t["target"].startswith("aggregate decode at N = 8"))
    assert line["result"] == "n/a" and line["measured"] is None
