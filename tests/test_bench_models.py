"""bench/models.py stays runnable: its report turns a run's numbers into issue 31's targets
(pass/fail), the docs section and the plot, from a saved models.json as from a run."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT


@pytest.fixture
def report(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # the benches import each other by name
    import models_report

    return models_report


def _turns(ttfts: list[float], cached: list[int], texts: list[str]) -> list[dict]:
    return [{"ttft": t, "cached_tokens": c, "prompt_tokens": 700 + 50 * i, "text": x, "kvtier": None}
            for i, (t, c, x) in enumerate(zip(ttfts, cached, texts))]


TEXTS = [f"answer {i}" for i in range(8)]


def _results() -> dict:
    """A --quick run's numbers (2 turns a block, 4 blocks): kvtier comes back warm, the first
    mlx_lm.server keeps its caches, the second recomputes on every switch and differs on turn 7."""
    model = {"arch": "llama", "hidden": 512, "layers": 8, "path": ".models/x", "weight_bytes": 107 << 20,
             "kv_bytes_per_token": 8192.0}
    return {"date": "2026-12-07 13:02", "machine": "test machine", "command": "python bench/models.py --quick",
            "load": {"start": "1.00", "end": "2.00"}, "seconds": 100.0, "system_tokens": 512,
            "turns_per_block": 2, "blocks": 4, "max_tokens": 16, "ram_budget": 9400320, "memory_budget": 140 << 20,
            "models": {"llama": {**model, "name": "llama", "load_seconds": [0.18, 0.28, 0.22]},
                       "qwen3_next": {**model, "name": "qwen3_next", "arch": "qwen3_next",
                                      "load_seconds": [0.25, 0.15, 0.10]}},
            "schedule": ["llama", "llama", "qwen3_next", "qwen3_next"] * 2,
            "servers": {
                "kvtier": {"flags": "kvtier serve ...", "peak_rss": 400 << 20, "loads": {"llama": [8.9, 0.7], "qwen3_next": [6.1]}, "unloads": [0.3, 0.25],
                           "turns": _turns([3.44, 0.13, 4.20, 0.24, 0.14, 0.21, 0.23, 0.23],
                                           [1, 730, 0, 615, 792, 824, 662, 709], TEXTS)},
                "mlx_lm.server": {"flags": "mlx_lm.server ...", "peak_rss": None,
                                  "turns": _turns([3.51, 0.60, 4.41, 0.30, 0.41, 0.31, 0.97, 0.42],
                                                  [1, 730, 0, 614, 793, 824, 661, 708], TEXTS)},
                "mlx_lm.server --prompt-cache-bytes": {
                    "flags": "mlx_lm.server ... --prompt-cache-bytes 9400320", "peak_rss": 397 << 20,
                    "turns": _turns([5.26, 0.27, 3.53, 0.25, 25.0, 0.27, 35.0, 0.51], [1, 730, 0, 614, 0, 824, 0, 708],
                                    TEXTS[:6] + ["another", TEXTS[7]])}}}


def test_each_turn_is_cold_warm_or_a_switch_back(report):
    assert report.kinds(_results()) == ["cold", "warm", "cold", "warm", "switch back", "warm", "switch back", "warm"]


def test_each_target_passes_or_fails_on_the_numbers(report):
    lines = report.targets(_results())
    assert [line["result"] for line in lines] == ["pass", "pass", "FAIL", "pass", "pass", "FAIL"]
    llama = lines[0]  # 0.14 s against the median load 0.22 s + 1.5 x its block's warm turn 0.21 s
    assert llama["measured"] == pytest.approx(0.14) and "0.22 s + 1.5 x 0.21 s" in llama["needed"]
    total = lines[4]  # 8.82 s against 70.09 s
    assert total["measured"] == pytest.approx(8.82 / 70.09) and total["target"].endswith("--prompt-cache-bytes's")
    assert lines[5]["shown"] == "7 of 8"
    printed = report.target_lines(lines)
    assert printed[0].startswith("PASS kvtier: first turn back on llama") and printed[2].startswith("FAIL")


def test_each_switch_back_is_held_to_the_warm_turns_of_its_own_block(report):
    """Warm turns grow slower as the conversation grows: a late switch-back is compared with
    the warm turns after it, not with the session's median, and the worst one decides."""
    results = _results()
    results["schedule"] = ["llama", "llama", "qwen3_next", "qwen3_next"] * 3
    results["servers"] = {"kvtier": {**results["servers"]["kvtier"], "turns": _turns(
        [3.0, 0.10, 4.0, 0.10, 0.30, 0.10, 0.25, 0.10, 0.70, 0.40, 0.26, 0.20], [1] * 12, [f"a{i}" for i in range(12)])}}
    llama, qwen = report.targets(results)[:2]
    # llama: 0.30 s within 0.22 + 1.5 x 0.10 = 0.37 s; 0.70 s within 0.22 + 1.5 x 0.40 = 0.82 s, the closer
    # (against the median warm turn of the session, 0.10 s, 0.70 s would fail)
    assert llama["result"] == "pass" and llama["measured"] == pytest.approx(0.70)
    assert "0.22 s + 1.5 x 0.40 s" in llama["needed"] and "each of 2" in llama["target"]
    assert qwen["result"] == "pass"  # 0.25 s within 0.15 + 1.5 x 0.10 = 0.30 s; 0.26 s within 0.45 s
    results["servers"]["kvtier"]["turns"][6]["ttft"] = 0.35  # past its own quick block's limit
    qwen = report.targets(results)[1]
    assert qwen["result"] == "FAIL" and qwen["measured"] == pytest.approx(0.35) and "1.5 x 0.10 s" in qwen["needed"]


def test_a_slow_switch_back_fails(report):
    results = _results()
    results["servers"]["kvtier"]["turns"][6]["ttft"] = 2.0  # qwen3_next's load 0.15 s + 1.5 x 0.235 s = 0.50 s
    assert report.targets(results)[1]["result"] == "FAIL"


def test_the_section_and_the_plot_come_from_a_saved_run(report, tmp_path):
    results = json.loads(json.dumps(_results()))
    results["targets"] = report.targets(results)
    results["reference"] = {"6": {"text": "answer 6", "equal": ["kvtier", "mlx_lm.server"]}}
    section = report.render(results)
    assert "python bench/models.py --quick" in section and section.count("| FAIL |") == 2
    assert "| 5 | llama | switch back | 900 | 0.14 s (792) | 0.41 s (793) | 25.00 s (0) | 0.70 s | yes |" in section
    assert "| 7 | qwen3_next | switch back | 1000 | 0.23 s (662) | 0.97 s (661) | 35.00 s (0) " \
           "|  | differs from mlx_lm.server --prompt-cache-bytes |" in section  # one load logged for two blocks
    # the floor: kvtier's two cold turns (3.44 + 4.20 s) against each peer's session (10.93 s, 70.09 s)
    assert "cold turns alone (each model's first: nothing to reuse) took 7.6 s: 0.70x mlx_lm.server's session, " \
           "0.11x mlx_lm.server --prompt-cache-bytes's session" in section
    assert "turn 7 equals kvtier, mlx_lm.server" in section and "took 0.30, 0.25 s" in section and "llama loaded 2 times for its 2 blocks of turns, in 8.9, 0.7 s" in section
    pytest.importorskip("matplotlib")
    report.plot(results, tmp_path / "models.png")
    assert (tmp_path / "models.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import models

    return models


def test_the_session_alternates_and_the_budget_fits_one_model(bench):
    sizes = bench.Sizes(system_tokens=2048, turns_per_block=3, blocks=4, max_tokens=32)
    assert bench.schedule(["a", "b"], sizes) == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
    models = {"a": {"weight_bytes": 100 << 20, "kv_bytes_per_token": 8192.0},
              "b": {"weight_bytes": 120 << 20, "kv_bytes_per_token": 2048.0}}
    ram, memory = bench.budgets(models, sizes, 2048)
    assert ram == int(1.25 * (2048 + 6 * (32 + bench.USER_TOKENS)) * 8192)  # a's conversation after its 6 turns
    assert memory == (120 << 20) + 2 * ram < (220 << 20)
    models["a"]["weight_bytes"] = 10 << 20  # the larger model and its KV would hold the smaller one too
    with pytest.raises(SystemExit, match="would hold both models"):
        bench.budgets(models, sizes, 2048)


def test_kvtier_loads_are_read_from_its_log(bench, tmp_path):
    log = tmp_path / "kvtier.log"
    log.write_text("2026-12-07 13:20:39,419 INFO kvtier.worker: model llama loaded in 8.9 s\n"
                   "2026-12-07 13:21:15,670 INFO kvtier.worker: unloading model llama (to make room for 'qwen3_next')\n"
                   "2026-12-07 13:21:22,080 INFO kvtier.worker: model qwen3_next loaded in 6.1 s\n"
                   "2026-12-07 13:21:55,852 INFO kvtier.worker: model llama loaded in 0.7 s\n")
    server = bench.Server("kvtier", [], 0, log)
    target = bench.Target("kvtier", "", [server], {"llama": (server, "llama"), "qwen3_next": (server, "qwen3_next")})
    assert bench.kvtier_loads(target) == {"llama": [8.9, 0.7], "qwen3_next": [6.1]}
    assert bench.kvtier_unloads(target) == []  # no "loading model" line after the unload
    log.write_text(log.read_text() + "2026-12-07 13:21:16,120 INFO kvtier.worker: loading model qwen3_next\n")
    assert bench.kvtier_unloads(target) == [0.45]
