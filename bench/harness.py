"""Shared by the demo and the benchmarks: servers as subprocesses, streamed requests timed
on the client side, and agent-shaped prompts."""

from __future__ import annotations

import http.client
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon.blas import with_openblas  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process (kvtier or mlx_lm.server) on 127.0.0.1 with a /health route."""

    def __init__(self, name: str, args: list[str], port: int, log: Path):
        self.name, self.args, self.port, self.log = name, args, port, log
        self.proc: subprocess.Popen | None = None

    @classmethod
    def kvtier(cls, model: Path, cache_dir: Path, log: Path, *extra: str) -> "Server":
        port = free_port()
        args = [sys.executable, "-m", "daemon.cli", "serve", "--model", str(model),
                "--port", str(port), "--cache-dir", str(cache_dir), *extra]
        return cls("kvtier", args, port, log)

    @classmethod
    def mlx_lm(cls, model: Path, log: Path) -> "Server":
        port = free_port()
        args = [sys.executable, "-m", "mlx_lm.server", "--model", str(model), "--port", str(port)]
        return cls("mlx_lm.server", args, port, log)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 300) -> "Server":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=with_openblas(os.environ),
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {self.log}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"{self.name} did not become healthy; see {self.log}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def restart(self) -> "Server":
        self.stop()
        return self.start()

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url + "/cache/stats", timeout=30) as r:
            return json.loads(r.read())


@dataclass
class Timed:
    ttft: float  # seconds from sending the request to the first streamed text
    total: float
    text: str
    usage: dict
    messages: list[dict] | None = None  # what was sent, when a session keeps it


def stream_chat(server: Server, model: str, messages: list[dict], max_tokens: int = 16) -> Timed:
    """POST a streaming chat completion and time the first text chunk on the client side."""
    body = json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens,
                       "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=3600)
    started = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{server.name}: HTTP {response.status}: {response.read()[:500]!r}")
    ttft, parts, usage = None, [], {}
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        usage = event.get("usage") or usage
        for choice in event.get("choices", []):
            text = choice.get("delta", {}).get("content") or ""
            if text and ttft is None:
                ttft = time.perf_counter() - started
            parts.append(text)
    total = time.perf_counter() - started
    conn.close()
    return Timed(ttft if ttft is not None else total, total, "".join(parts), usage)


# -- an agent session --------------------------------------------------------------------
RESTART = "restart"


@dataclass
class Step:
    label: str
    project: str
    user: str
    tool_result: str | None = None  # appended as a tool message before the user turn


SESSION = [
    Step("first request", "webshop", "Look at the failing checkout test."),
    Step("tool result", "webshop", "What does that tell you?", "FAILED tests/test_checkout.py::test_total - assert 41 == 42"),
    Step("next turn", "webshop", "Fix the rounding in cart.total()."),
    Step("tool result", "webshop", "Run the tests again.", "1 failed, 87 passed"),
    Step(RESTART, "", ""),
    Step("after restart", "webshop", "Why does it still fail?", "E   Decimal('41.99') != Decimal('42.00')"),
    Step("switch project", "compiler", "Explain the parser's error recovery."),
    Step("next turn", "compiler", "Add a test for an unclosed bracket.", "tests/test_parser.py created"),
    Step("switch back", "webshop", "Summarise what we changed today."),
]


def run_session(server: "Server", model: str, systems: dict[str, str], max_tokens: int) -> list[tuple[Step, Timed]]:
    conversations = {name: [{"role": "system", "content": text}] for name, text in systems.items()}
    results = []
    server.start()
    try:
        for step in SESSION:
            if step.label == RESTART:
                server.restart()
                continue
            messages = conversations[step.project]
            if step.tool_result:
                messages.append({"role": "tool", "content": step.tool_result})
            messages.append({"role": "user", "content": step.user})
            timed = stream_chat(server, model, messages, max_tokens)
            timed.messages = [dict(m) for m in messages]
            messages.append({"role": "assistant", "content": timed.text})
            results.append((step, timed))
    finally:
        server.stop()
    return results


# -- agent-shaped prompts ---------------------------------------------------------------
_VERBS = ["read", "write", "list", "search", "run", "patch", "format", "lint", "test", "fetch",
          "diff", "commit", "open", "rename", "delete", "build", "profile", "trace", "review"]
_NOUNS = ["file", "directory", "symbol", "test", "command", "branch", "issue", "module", "config",
          "log", "package", "function", "class", "snippet", "workspace", "terminal", "notebook"]


def tool_definitions(count: int, seed: int = 0) -> list[dict]:
    """OpenAI-style tool definitions, deterministic, shaped like a coding agent's."""
    rng = random.Random(seed)
    tools = []
    for i in range(count):
        verb, noun = rng.choice(_VERBS), rng.choice(_NOUNS)
        params = {f"{rng.choice(_NOUNS)}_{j}": {"type": rng.choice(["string", "integer", "boolean"]),
                                                "description": f"The {rng.choice(_NOUNS)} to {verb}, "
                                                               f"relative to the {rng.choice(_NOUNS)}."}
                  for j in range(rng.randint(2, 4))}
        tools.append({"type": "function", "function": {
            "name": f"{verb}_{noun}_{i}",
            "description": f"{verb.capitalize()} a {noun} in the current {rng.choice(_NOUNS)}. "
                           f"Use it when the user asks to {verb} a {noun}; never guess paths.",
            "parameters": {"type": "object", "properties": params, "required": list(params)[:1]}}})
    return tools


def agent_system_prompt(target_tokens: int, tokenizer, project: str = "kvtier", seed: int = 0,
                        step: int = 4) -> str:
    """A system prompt with tool definitions, grown `step` tools at a time until it is about
    `target_tokens` long."""
    head = (f"You are an autonomous coding agent working in the {project} repository. Think step by "
            "step, call tools to inspect files before editing them, and keep answers short.\n"
            "# Tools\n")
    text, count = head, 0
    while len(tokenizer.encode(text)) < target_tokens:
        count += step
        text = head + "\n".join(json.dumps(t) for t in tool_definitions(count, seed))
    return text


def machine_description() -> str:
    import mlx.core as mx

    cpu = platform.processor() or platform.machine()
    return (f"{platform.system()} {platform.machine()} ({cpu}), {os.cpu_count()} cores, "
            f"MLX {mx.__version__} on {mx.default_device()}, Python {platform.python_version()}")


def write_section(name: str, section: str, doc: Path | None = None) -> None:
    """Replace the text between `<!-- name:begin -->` and `<!-- name:end -->` in
    docs/benchmarks.md, or `doc` when given (appending the markers if missing)."""
    doc = doc or ROOT / "docs" / "benchmarks.md"
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    doc.write_text(head + begin + "\n" + section + "\n" + end + rest.split(end, 1)[1])
