"""`kvtier serve` refuses to start, with one line and a non-zero exit, where it could not
serve: a busy port, a directory that is not a model (checked before listening, or failing
to load after), before loading anything or touching the cache directory."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, free_port, model_variant


def serve(model: Path, cache_dir: Path, port: int, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon.cli", "serve", "--model", str(model),
                           "--port", str(port), "--cache-dir", str(cache_dir), "--max-batch", "1",
                           "--log-level", "warning"],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_a_busy_port_is_one_line_before_the_model_loads_or_the_cache_is_made(tmp_path, tiny_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = serve(tiny_model, tmp_path / "cache", port)
    assert done.returncode != 0
    assert done.stderr.splitlines() == [
        f"kvtier: cannot listen on 127.0.0.1:{port}: the address is already in use "
        "(another kvtier serve?); choose another with --port"]
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("case", ["empty", "config not JSON", "config without model_type"])
def test_a_directory_that_is_not_a_model_is_refused_before_listening(tmp_path, case):
    model = tmp_path / "model"
    model.mkdir()
    if case != "empty":
        (model / "config.json").write_text("{not json" if case == "config not JSON" else '{"hidden": 8}')
    done = serve(model, tmp_path / "cache", free_port())
    assert done.returncode != 0
    assert len(done.stderr.splitlines()) == 1 and "is not a model" in done.stderr, done.stderr
    assert not (tmp_path / "cache").exists()


def test_a_model_that_fails_to_load_ends_the_daemon_with_one_line(tmp_path, tiny_model):
    """config.json is fine, the weights do not fit it: found only by loading, which runs in the
    background while /health answers; the daemon then exits 1 rather than answer 503 forever."""
    def widen(config: dict) -> None:
        config["hidden_size"] *= 2

    model = model_variant(tiny_model, tmp_path / "model", "config.json", widen)
    done = serve(model, tmp_path / "cache", free_port())
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line or line.startswith("kvtier:")]
    assert len(errors) == 2, done.stderr  # the log's one line, and the command's
    assert errors[-1].startswith(f"kvtier: could not load the model {model}: ValueError")
    assert json.loads((model / "config.json").read_text())["hidden_size"] == 128
