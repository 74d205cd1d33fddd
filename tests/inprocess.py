"""The daemon's aiohttp app served in the test process: aiohttp's TestServer and TestClient
on an event loop of their own thread, the real engine loading a generated model.

For tests of what routes answer (validation, error bodies, schemas, SDK clients), where a
`kvtier serve` subprocess adds only its start-up. It has conftest.Daemon's face (url, port,
model, get, client), so socket-level helpers and the SDKs work on it unchanged.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Coroutine, TypeVar

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from daemon.app import init_app
from daemon.cli import build_parser, serve_config
from daemon.server import Serving
from daemon.state import STATE
from kvtier.config import ServeConfig
from tests.conftest import TEST_BLOCK_SIZE, TEST_MAX_TOKENS

T = TypeVar("T")


class ApiTestServer(TestServer):
    """TestServer served as the daemon serves (daemon/server.py): unparsable requests get
    its JSON errors."""

    serving: Serving | None = None

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        self.serving = Serving(self.app)
        return await self.serving.make_runner()  # TestServer sets it up, serves it, cleans it up

    async def close(self) -> None:
        await super().close()
        if self.serving is not None:
            await self.serving.app_runner.cleanup()  # then the app's shutdown and cleanup, as serving does


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()

    @property
    def content(self) -> Any:
        """The JSON value of a JSON answer, else its text (a stream's events)."""
        return self.json() if "json" in self.headers.get("Content-Type", "") else self.text


class InProcessDaemon:
    """The app `kvtier serve` would run with the same flags, served on 127.0.0.1."""

    def __init__(self, model: Path, cache_dir: Path, *extra: str, ceiling: int | None = TEST_MAX_TOKENS,
                 configure: Callable[[ServeConfig], None] | None = None):
        self.model, self.cache_dir = model, cache_dir
        ceiling_args = [] if ceiling is None else ["--max-tokens", str(ceiling)]  # see conftest
        args = build_parser().parse_args([
            "serve", "--model", str(model), "--cache-dir", str(cache_dir),
            "--block-size", str(TEST_BLOCK_SIZE),
            "--prefill-step-size", "2048",  # mlx-lm's default, not timed here (tests/test_chunking.py)
            *ceiling_args, *extra])
        self.config = serve_config(args)
        if configure is not None:  # what no flag says (yet)
            configure(self.config)
        self.app = init_app(self.config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-aiohttp", daemon=True)
        self._http: TestClient | None = None

    def start(self, timeout: float = 120) -> "InProcessDaemon":
        self._thread.start()
        self._http = self._run(self._client())
        worker = self.app[STATE].worker
        if not worker.ready.wait(timeout) or worker.engine is None:
            self.stop()
            raise RuntimeError(f"the model did not load: {worker.load_error}")
        return self

    async def _client(self) -> TestClient:
        client = TestClient(ApiTestServer(self.app))
        await client.start_server()
        return client

    def stop(self) -> None:
        """Close the server: the app's shutdown flushes the cache and stops the MLX thread."""
        if self._http is not None:
            self._run(self._http.close())
            self._http = None
        if self._thread.is_alive():  # once: a failed start has stopped it already
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def _run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 300) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    @property
    def port(self) -> int:
        assert self._http is not None and self._http.port is not None
        return self._http.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, *, json: Any = None, data: bytes | None = None,
                headers: dict[str, str] | None = None) -> Reply:
        """One request through aiohttp's test client, its whole answer read."""
        assert self._http is not None
        http = self._http

        async def send() -> Reply:
            async with http.request(method, path, json=json, data=data, headers=headers) as response:
                return Reply(response.status, dict(response.headers), await response.read())

        return self._run(send())

    def post(self, path: str, body: Any = None, *, raw: bytes | None = None,
             headers: dict[str, str] | None = None) -> Reply:
        """POST `body` as JSON, or `raw` bytes as they are (sent as application/json)."""
        if raw is not None:
            return self.request("POST", path, data=raw,
                                headers={"Content-Type": "application/json", **(headers or {})})
        return self.request("POST", path, json=body, headers=headers)

    def get(self, path: str) -> Any:
        """GET a JSON route that must answer 200, with the API key when one is set."""
        key = self.config.api_key
        reply = self.request("GET", path, headers={"Authorization": f"Bearer {key}"} if key else None)
        assert reply.status == 200, (path, reply.status, reply.body[:500])
        return reply.json()

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.config.api_key or "unused",
                             max_retries=0, timeout=300)
