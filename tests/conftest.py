"""Shared fixtures: generated models (through mlx_lm.load), a real daemon process, baselines."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / ".models"
# Small blocks make short test prompts span many blocks (partial hits, chains, eviction).
TEST_BLOCK_SIZE = 64
# The random test models never stop by themselves: the test daemons cap answers where a test
# sets no limit (ceiling=None: none, for the tests of the limit itself).
TEST_MAX_TOKENS = 512


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def openai_spec() -> Path | None:
    """../shared/specs/openai-openapi.json, beside the repository or a worktree of it."""
    for parent in ROOT.parents:
        spec = parent / "shared" / "specs" / "openai-openapi.json"
        if spec.exists():
            return spec
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    from tests.support.schedule import longest_first

    items[:] = longest_first(items)  # the slowest files first, for `make test`'s processes


@pytest.fixture(scope="session")
def llama_model() -> Path:
    from tests.support.testmodels import make_model

    return make_model(MODELS / "llama", "llama")


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """2 layers, hidden 64: prefills a 20K-token Claude Code prompt in a few seconds."""
    from tests.support.testmodels import make_model

    return make_model(MODELS / "tiny", "llama", hidden=64, layers=2)


def model_variant(model: Path, out: Path, json_file: str, change) -> Path:
    """`model` at `out` with one JSON file (config.json, tokenizer_config.json) passed through
    `change`; every other file is a link, so the weights are the same."""
    out.mkdir()
    for item in model.iterdir():
        if item.name != json_file:
            (out / item.name).symlink_to(item)
    config = json.loads((model / json_file).read_text())
    change(config)
    (out / json_file).write_text(json.dumps(config))
    return out


@lru_cache(maxsize=None)
def _loaded(path: str):
    import mlx_lm

    return mlx_lm.load(path)


@lru_cache(maxsize=None)
def _generated(path: str, tokens: tuple[int, ...], max_tokens: int) -> str:
    """Greedy plain mlx-lm is deterministic: a prompt many tests (or asserts) check against is
    computed once per test process (a ~700-token prompt costs seconds on 2 cores)."""
    import mlx_lm

    model, tokenizer = _loaded(path)
    return mlx_lm.generate(model, tokenizer, prompt=list(tokens), max_tokens=max_tokens)


class Reference:
    """Plain mlx-lm, no cache of ours: what every cached answer must equal."""

    def __init__(self, model_path: Path):
        self.path = str(model_path)
        self.model, self.tokenizer = _loaded(self.path)

    def chat_tokens(self, messages: list[dict]) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    def generate(self, tokens: list[int], max_tokens: int) -> str:
        return _generated(self.path, tuple(tokens), max_tokens)

    def chat(self, messages: list[dict], max_tokens: int) -> str:
        return self.generate(self.chat_tokens(messages), max_tokens)

    def logprobs(self, tokens: list[int], max_tokens: int) -> list[tuple[int, list[float]]]:
        """Greedy decode with mlx-lm's `generate_step`: each token and the log-probabilities
        (over the vocabulary) it was chosen from."""
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        steps = generate_step(mx.array(tokens), self.model, max_tokens=max_tokens)
        return [(int(token), logprobs.tolist()) for token, logprobs in steps]


@pytest.fixture(scope="session")
def reference(llama_model) -> Reference:
    return Reference(llama_model)


@pytest.fixture(scope="session")
def tiny_reference(tiny_model) -> Reference:
    """For tests whose asserts do not depend on the model's size (faults, files, commands): the
    tiny model's answers depend on the context too, and its prefills take milliseconds."""
    return Reference(tiny_model)


class Daemon:
    """`kvtier serve` as a real subprocess on 127.0.0.1."""

    def __init__(self, model: Path | str, cache_dir: Path, *extra: str, env: dict[str, str] | None = None,
                 ceiling: int | None = TEST_MAX_TOKENS):
        self.model, self.cache_dir, self.extra = model, cache_dir, list(extra)
        self.ceiling = [] if ceiling is None else ["--max-tokens", str(ceiling)]
        self.env = dict(os.environ, **(env or {}))
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = cache_dir.parent / f"daemon-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _open(self, path: str, timeout: float):
        extra = self.extra
        key = extra[extra.index("--api-key") + 1] if "--api-key" in extra else None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return urllib.request.urlopen(urllib.request.Request(self.url + path, headers=headers),
                                      timeout=timeout)

    def start(self, timeout: float = 120) -> "Daemon":
        args = [sys.executable, "-m", "daemon.cli", "serve", "--model", str(self.model),
                "--port", str(self.port), "--cache-dir", str(self.cache_dir),
                "--block-size", str(TEST_BLOCK_SIZE),
                # After a restart, blocks come from disk unless a test asks for the prefetch.
                "--prefetch", "0",
                # mlx-lm's default chunk, not one timed on this machine (tests/test_chunking.py does).
                "--prefill-step-size", "2048", *self.ceiling, *self.extra]
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT, env=self.env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.log.read_text()[-3000:]}")
            try:
                with self._open("/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(self.log.read_text()[-3000:])

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Stop the daemon (SIGTERM flushes; SIGKILL does not) and return its exit code."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=120)
        self.proc = None
        return code

    def restart(self) -> "Daemon":
        self.stop()
        return self.start()

    def get(self, path: str) -> Any:
        with self._open(path, timeout=30) as r:
            return json.loads(r.read())

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0,
                             timeout=300)


@pytest.fixture
def daemon_factory(tmp_path):
    started: list[Daemon] = []

    def make(model: Path, *extra: str, cache_dir: Path | None = None,
             env: dict[str, str] | None = None, ceiling: int | None = TEST_MAX_TOKENS) -> Daemon:
        daemon = Daemon(model, cache_dir or tmp_path / "cache", *extra, env=env, ceiling=ceiling)
        started.append(daemon)
        return daemon.start()

    yield make
    for daemon in started:
        if daemon.proc is not None:
            daemon.stop(signal.SIGKILL)


@pytest.fixture
def daemon(daemon_factory, llama_model) -> Daemon:
    return daemon_factory(llama_model)


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory, llama_model):
    """One daemon for a module's tests that do not care about each other's cache state."""
    daemon = Daemon(llama_model, tmp_path_factory.mktemp("shared") / "cache").start()
    yield daemon
    daemon.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def app_daemon(tmp_path_factory, llama_model):
    """The daemon's app in this process, for a module's tests of what routes answer, where
    a subprocess adds nothing but its start-up (tests/inprocess.py)."""
    from tests.inprocess import InProcessDaemon

    daemon = InProcessDaemon(llama_model, tmp_path_factory.mktemp("app") / "cache").start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def keyed_app(tmp_path_factory, llama_model):
    """The app in this process with --api-key, for what reaches it before the key check."""
    from tests.inprocess import InProcessDaemon

    daemon = InProcessDaemon(llama_model, tmp_path_factory.mktemp("keyed-app") / "cache",
                             "--api-key", "s3cret").start()
    yield daemon
    daemon.stop()


@pytest.fixture
def app_factory(tmp_path):
    """In-process apps of a given model and flags, each with its own cache (or a given one, as a
    restart finds it), stopped after the test."""
    from tests.inprocess import InProcessDaemon

    started: list = []

    def make(model: Path, *extra: str, ceiling: int | None = TEST_MAX_TOKENS, cache_dir: Path | None = None):
        daemon = InProcessDaemon(model, cache_dir or tmp_path / f"cache-{len(started)}", *extra, ceiling=ceiling)
        started.append(daemon)
        return daemon.start()

    yield make
    for daemon in started:
        daemon.stop()


def raw_http(port: int, request: bytes, timeout: float = 300) -> tuple[int, bytes]:
    """Send `request` as bytes (no client library checks what goes on the wire); return the
    status and the body of the answer: Content-Length bytes, or all until the daemon closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        received = b""
        while b"\r\n\r\n" not in received and (chunk := sock.recv(65536)):
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        length = re.search(rb"\r\ncontent-length: *(\d+)", head, re.I)
        while (length is None or len(body) < int(length.group(1))) and (chunk := sock.recv(65536)):
            body += chunk
    return int(head.split(b" ", 2)[1]), body


def post(app, path: str, body, raw: bytes | None = None) -> tuple[int, Any, dict[str, str]]:
    """POST `body` as JSON (or `raw` bytes as they are) to an in-process app; return the status,
    the JSON (or text) answer and its headers, for errors too."""
    reply = app.post(path, body, raw=raw)
    return reply.status, reply.content, reply.headers


def error_body(error: Any) -> dict[str, Any]:
    """The JSON body of an SDK's API error (openai's and anthropic's type it `object`)."""
    assert isinstance(error.body, dict), error.body
    return error.body


def http_request(method: str, path: bytes | str, headers: dict[bytes, bytes] | None = None,
                 body: bytes = b"") -> bytes:
    """An HTTP/1.1 request as bytes; header names and values go out exactly as given."""
    path = path.encode() if isinstance(path, str) else path
    given = {b"Host": b"127.0.0.1", b"Connection": b"close", b"Content-Type": b"application/json",
             b"Content-Length": b"%d" % len(body), **(headers or {})}
    lines = [method.encode() + b" " + path + b" HTTP/1.1"] + [k + b": " + v for k, v in given.items()]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@pytest.fixture
def tmpfs(tmp_path):
    """Mount real filesystems (tmpfs) of a given size: they fill up, and can be resized or
    remounted read-only (needs root, as CI has)."""
    mounted: list[Path] = []

    def mount(size: str):
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                          capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)

def agent_messages(project: str = "kvtier", question: str = "List the files.", repeat: int = 6) -> list[dict]:
    """An agent-style conversation: a long system prompt with tools, then a question."""
    tools = "\n".join(f"- tool {name}: {desc}" for name, desc in [
        ("read_file", "read a file from the workspace and return its text"),
        ("write_file", "write text to a file, creating directories as needed"),
        ("run_shell", "run a shell command in the project root and return its output"),
        ("search", "search the code base for a regular expression"),
    ])
    system = (f"You are a careful coding agent working on the {project} project. "
              f"Follow the user's instructions exactly.\n{tools}\n") * repeat
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
