"""`kvtier serve` refuses to start, with one line and a non-zero exit, where it could not
serve: a busy port, a directory that is not a model (checked before listening, or failing
to load after), before loading anything or touching the cache directory."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port, model_variant


def serve(model: Path, cache_dir: Path, port: int, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon.cli", "serve", "--model", str(model),
                           "--port", str(port), "--cache-dir", str(cache_dir),
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


# -- a cache directory this user cannot read ------------------------------------------------
NOBODY = 65534


def _env_without_preload() -> dict[str, str]:
    """setpriv aborts with OpenBLAS preloaded (it changes ids with the library's threads
    running); the daemon preloads it again itself."""
    return {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}


def _unprivileged() -> tuple[list[str], str]:
    """A command prefix that runs this interpreter as uid 65534 (nobody); where nobody cannot
    run it (a virtualenv under root's private home), as root without the capabilities that
    let root ignore file permissions. And how it runs, for the assertion messages."""
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to run the daemon without root's file access")
    if os.geteuid() != 0:
        return [], "this test's own user"
    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    probe = subprocess.run([*as_nobody, sys.executable, "-c", "import daemon.app, daemon.cli"],
                           cwd=ROOT, capture_output=True, env=_env_without_preload())
    if probe.returncode == 0:
        return as_nobody, "uid 65534"
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner,-chown"], \
        "root without CAP_DAC_OVERRIDE (nobody cannot run this interpreter)"


@pytest.fixture
def others_cache(tiny_model):
    """A world-readable copy of the model, and a cache directory of another user (0700)."""
    if sys.platform != "linux":
        pytest.skip("runs the daemon as another user through setpriv (Linux)")
    root = Path(tempfile.mkdtemp(prefix="kvtier-unprivileged-"))
    try:
        root.chmod(0o755)
        model = shutil.copytree(tiny_model, root / "model")
        for path in [model, *model.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        cache = root / "cache"
        (cache / "index").mkdir(parents=True)
        (cache / "index" / "data.mdb").write_bytes(b"")
        if os.geteuid() == 0:  # another user's: neither nobody nor root without its capabilities may enter
            for path in (cache / "index" / "data.mdb", cache / "index", cache):
                os.chown(path, NOBODY + 1, NOBODY + 1)
            cache.chmod(0o700)
        else:  # this user's own, without permissions
            cache.chmod(0)
        yield model, cache
    finally:
        (root / "cache").chmod(0o700)
        shutil.rmtree(root)


def test_a_cache_directory_the_user_cannot_read_serves_from_ram_and_says_why(others_cache):
    model, cache = others_cache
    prefix, who = _unprivileged()
    port = free_port()
    daemon = subprocess.Popen([*prefix, sys.executable, "-m", "daemon.cli", "serve", "--model", str(model),
                               "--port", str(port), "--cache-dir", str(cache),
                               "--prefetch", "0"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=_env_without_preload())
    try:
        health = _wait_for_health(daemon, port)
        assert health["disk_writable"] is False and "PermissionError" in health["disk_error"], who
        stats = _get(port, "/cache/stats")
        assert stats["disk"]["writable"] is False and stats["disk"]["error"] == health["disk_error"]
        answer = _get(port, "/v1/completions", {"model": "default", "prompt": "the quick brown fox " * 40, "max_tokens": 4})
        assert answer["usage"]["completion_tokens"] == 4
    finally:
        daemon.terminate()
        output = daemon.communicate(timeout=120)[0]
    assert daemon.returncode == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]


@pytest.mark.parametrize("command", ["stats", "ls"])
def test_the_cli_on_a_cache_directory_it_cannot_read_is_one_line(others_cache, command):
    _, cache = others_cache
    prefix, who = _unprivileged()
    done = subprocess.run([*prefix, sys.executable, "-m", "daemon.cli", command, "--cache-dir", str(cache)],
                          cwd=ROOT, capture_output=True, text=True, env=_env_without_preload(), timeout=120)
    assert done.returncode != 0, who
    assert done.stderr.splitlines() == [f"kvtier: cannot open the cache at {cache}: Permission denied"], who


def _wait_for_health(daemon: subprocess.Popen, port: int) -> dict:
    while daemon.poll() is None:
        try:
            return _get(port, "/health")
        except OSError:
            time.sleep(0.2)
    assert daemon.stdout is not None
    raise AssertionError(f"the daemon exited {daemon.returncode}: {daemon.stdout.read()[-3000:]}")


def _get(port: int, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())
