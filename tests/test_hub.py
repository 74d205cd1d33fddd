"""`kvtier serve --model <hub id>` downloads a model on first use, against a local mirror of the
Hugging Face hub's file endpoints (HF_ENDPOINT -> a small aiohttp server serving a generated
model); `--offline` forbids it."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from aiohttp import web

from tests.conftest import ROOT, Daemon, Reference, free_port

REPO = "kvtier-test/tiny-chat"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubMirror:
    """The hub endpoints snapshot_download uses: revision info, the file tree, resolve."""

    def __init__(self, repos: dict[str, Path]):
        self.repos = repos
        self.downloads: list[str] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def _files(self, request: web.Request) -> dict[str, Path]:
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        if repo not in self.repos:
            raise web.HTTPNotFound(headers={"X-Error-Code": "RepoNotFound"})
        return {p.name: p for p in sorted(self.repos[repo].iterdir()) if p.is_file()}

    async def revision(self, request: web.Request) -> web.Response:
        files = self._files(request)
        return web.json_response({"id": request.match_info["name"], "sha": COMMIT,
                                  "siblings": [{"rfilename": name} for name in files]})

    async def tree(self, request: web.Request) -> web.Response:
        return web.json_response([{"type": "file", "path": name, "size": path.stat().st_size,
                                   "oid": hashlib.sha1(path.read_bytes()).hexdigest()}
                                  for name, path in self._files(request).items()])

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        path = self._files(request).get(request.match_info["file"])
        if path is None:
            raise web.HTTPNotFound(headers={"X-Error-Code": "EntryNotFound"})
        data = path.read_bytes()
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Content-Length": str(len(data))}
        if request.method == "HEAD":
            return web.Response(headers=headers)
        self.downloads.append(path.name)
        return web.Response(body=data, headers=headers)

    def __enter__(self) -> "HubMirror":
        app = web.Application()
        repo = "/{org}/{name}"
        app.router.add_get(f"/api/models{repo}/revision/{{rev}}", self.revision)
        app.router.add_get(f"/api/models{repo}/tree/{{rev}}", self.tree)
        app.router.add_route("*", f"{repo}/resolve/{{rev}}/{{file}}", self.resolve)
        self.runner = web.AppRunner(app, access_log=None)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    async def _start(self) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """An empty Hugging Face cache of its own; the daemon subprocess inherits it."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path


def serve_exit(model: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon.cli", "serve", "--model", model,
                           "--port", str(free_port()), *extra], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_a_hub_model_is_downloaded_on_first_use_then_served_offline(hub_env, tiny_model, monkeypatch):
    with HubMirror({REPO: tiny_model}) as mirror:
        monkeypatch.setenv("HF_ENDPOINT", mirror.url)
        daemon = Daemon(REPO, hub_env / "cache").start()
        try:
            messages = [{"role": "user", "content": "Which files changed?"}]
            answer = daemon.client().chat.completions.create(model=REPO, messages=messages,
                                                             max_tokens=8, temperature=0)
        finally:
            daemon.stop()
        assert answer.choices[0].message.content == Reference(tiny_model).chat(messages, 8)
        assert sorted(mirror.downloads) == sorted(p.name for p in tiny_model.iterdir()
                                                  if p.suffix in (".json", ".safetensors"))
        log = daemon.log.read_text()
        assert f"downloading {REPO} from {mirror.url}" in log
        assert "model.safetensors" in log and "100%" in log  # huggingface_hub's progress bars
    # The mirror is gone: --offline starts from the Hugging Face cache, without a download.
    daemon = Daemon(REPO, hub_env / "cache", "--offline").start()
    daemon.stop()
    assert "downloading" not in daemon.log.read_text()


def test_offline_and_unknown_models_stop_the_daemon_with_a_clear_message(hub_env, tiny_model,
                                                                         monkeypatch):
    offline = serve_exit("kvtier-test/not-downloaded", "--offline")
    assert offline.returncode == 2 and "--offline forbids downloading it" in offline.stderr
    with HubMirror({REPO: tiny_model}) as mirror:
        monkeypatch.setenv("HF_ENDPOINT", mirror.url)
        unknown = serve_exit("kvtier-test/no-such-model")
        missing_dir = serve_exit(str(hub_env / "no-such-dir"))
    assert unknown.returncode == 2 and "no model 'kvtier-test/no-such-model'" in unknown.stderr
    assert missing_dir.returncode == 2 and "no model directory at" in missing_dir.stderr
    assert mirror.downloads == []
