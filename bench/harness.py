"""Shared by the demo and the benchmarks: servers as subprocesses, streamed requests timed
on the client side, an agent session, and where results are written (prompts: prompts.py)."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


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
    ttft: float | None = None
    parts: list[str] = []
    usage: dict = {}
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


# What a bench of the disk tier passes: no start-up prefetch, so that after a restart the
# blocks come from disk (the default prefetch would read them into RAM in the background).
DISK_PATH = ("--prefetch", "0")


def wait_for_prefetch(server: Server, timeout: float = 600) -> dict:
    """The start-up prefetch's stats once it has ended (read the cache into RAM)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        prefetch = server.stats().get("prefetch")
        if prefetch is not None and prefetch["done"]:
            return prefetch
        time.sleep(0.05)
    raise TimeoutError("the start-up prefetch did not end")


def warm_up(server: Server, model: str) -> None:
    """One short unrelated request after each (re)start: MLX's first-call set-up (kernels,
    buffers) would otherwise land in whichever scenario happens to come first."""
    stream_chat(server, model, [{"role": "user", "content": "Say hi."}], max_tokens=2)


def cached_tokens(usage: dict) -> int:
    return (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0


def record(timed: Timed) -> dict:
    """The raw numbers of one streamed request, as the benchmarks store them in their JSON."""
    return {"ttft": round(timed.ttft, 4), "prompt_tokens": timed.usage.get("prompt_tokens"),
            "cached_tokens": cached_tokens(timed.usage), "kvtier": timed.usage.get("kvtier"),
            "text": timed.text}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


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


def command_line(script: str, argv: list[str] | None = None) -> str:
    """The command that produced a result, for the docs: `python bench/<script>` and its
    arguments (`argv`, default this process's)."""
    return " ".join(["python", f"bench/{script}", *(sys.argv[1:] if argv is None else argv)])


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


def write_results(name: str, results: dict, render: Callable[[dict], str], plot: Callable[[dict, Path], None],
                  out: Path) -> None:
    """A bench's raw numbers (bench/NAME.json), its section of benchmarks.md and its plot
    (bench/NAME.png), under `out` (docs/, or a --quick run's directory)."""
    (out / "bench").mkdir(parents=True, exist_ok=True)
    (out / "bench" / f"{name}.json").write_text(json.dumps(results, indent=2))
    write_section(name, render(results), out / "benchmarks.md")
    plot(results, out / "bench" / f"{name}.png")


def bench_options(name: str, description: str, quick_help: str, argv: list[str] | None) -> tuple[argparse.Namespace, Path]:
    """The options of a bench with targets (--quick, --out, --render) and the directory it writes to."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=f"{quick_help}; writes to a temp dir unless --out is given")
    parser.add_argument("--out", type=Path, default=None, help="where benchmarks.md and bench/ are (default: docs)")
    parser.add_argument("--render", action="store_true", help=f"only rewrite the section and plot from {name}.json")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    out = args.out or (Path(tempfile.mkdtemp(prefix=f"kvtier-{name}-out-")) if args.quick else ROOT / "docs")
    return args, out


def wrote_line(name: str, results: dict, out: Path) -> str:
    return (f"{results['seconds'] / 60:.1f} min; load average {results['load']['start']} -> {results['load']['end']}; "
            f"wrote {out / 'bench' / f'{name}.json'}, {name}.png and {out / 'benchmarks.md'}")


def table(header: list[str], rows: list[list[str]], align: list[str]) -> list[str]:
    """A markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"] + \
           ["| " + " | ".join(row) + " |" for row in rows]


def target_table(checks: list[dict]) -> list[str]:
    """Pass/fail lines: a check's `shown` text, else its `value` as a percentage."""
    rows = [[c["name"], c.get("shown") or f"{100 * c['value']:.1f}%", c["target"], "pass" if c["pass"] else "FAIL"]
            for c in checks]
    return table(["target", "measured", "needed", "result"], rows, ["---", "---:", "---:", "---"])


def write_result(name: str, result: dict, section: str) -> None:
    """docs/bench/NAME.json (the raw numbers) and NAME's section of docs/benchmarks.md."""
    (ROOT / "docs" / "bench").mkdir(exist_ok=True)
    (ROOT / "docs" / "bench" / f"{name}.json").write_text(json.dumps(result, indent=2))
    write_section(name, section)
