"""Parallel agents: N conversations at once sharing one system prompt, kvtier vs mlx_lm.server.

For N = 1, 2, 4, 8: N conversations, each with its own question and sharing a system prompt
new to the server (so the first round is cold), send their turns at the same time; each
round appends the answers and a follow-up. Per server and N: wall time per round,
aggregate decode tokens/s, TTFT p50/p95, and the longest gap between two streamed chunks of
one stream.

Aggregate decode tokens/s counts the tokens streamed while all N streams decode (from the
last stream's second token to the first stream's last), a span in which the server does
nothing else. From the round's first to its last token instead (also reported), the span
holds the prefills of the streams that start later, which a server streaming each first
token as soon as it has it (kvtier) computes inside it and one that prefills all waiting
prompts before decoding any (mlx_lm.server) before it, and a tail with fewer streams left.

Then a long-prefill probe: one stream decodes while another request prefills a cold
~8K-token prompt; the stream's longest gap is reported (chunked prefill keeps it near one
prefill chunk plus one decode step).

Servers: kvtier as configured by default (batched only where exact, else interleaved, each
request decoding its own row: on Linux with OpenBLAS the latter; the label says which),
kvtier --batch-inexact, and mlx_lm.server, all running at once
and taking turns round by round (in a rotating order, a pause between two), so that other
load on the machine falls on them alike.

    python bench/parallel.py [--quick] [--out docs]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from harness import ROOT, Server, machine_description, write_section
from prompts import agent_system_prompt
from tests.support.testmodels import make_model

MODEL: dict = {"arch": "llama", "hidden": 256, "layers": 4}
SETTLE = 0.5  # seconds between two servers' rounds: the last one's background work (disk writes) ends


@dataclass
class Stream:
    ttft: float = 0.0
    arrivals: list[float] = field(default_factory=list)  # seconds since the request was sent
    text: str = ""
    completion_tokens: int = 0
    sent: float = 0.0

    @property
    def longest_gap(self) -> float:
        return max((b - a for a, b in zip(self.arrivals, self.arrivals[1:])), default=0.0)


def stream(server: Server, model: str, messages: list[dict], max_tokens: int,
           on_first: threading.Event | None = None) -> Stream:
    body = json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=3600)
    result = Stream(sent=time.perf_counter())
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{server.name}: HTTP {response.status}: {response.read()[:300]!r}")
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if event.get("usage"):
            result.completion_tokens = event["usage"].get("completion_tokens", 0)
        for choice in event.get("choices", []):
            text = choice.get("delta", {}).get("content") or ""
            if text:
                result.arrivals.append(time.perf_counter() - result.sent)
                result.text += text
                if on_first is not None:
                    on_first.set()
    conn.close()
    result.ttft = result.arrivals[0] if result.arrivals else time.perf_counter() - result.sent
    return result


def at_once(server: Server, model: str, conversations: list[list[dict]], max_tokens: int) -> list[Stream]:
    results: list[Stream | None] = [None] * len(conversations)

    def run(i: int) -> None:
        results[i] = stream(server, model, conversations[i], max_tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(conversations))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results  # type: ignore[return-value]


def system_prompt(tokens: int, tokenizer, project: str = "kvtier") -> str:
    return agent_system_prompt(tokens, tokenizer, project=project)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class Parallel:
    """N conversations on one server, a round at a time (the servers take turns, round by
    round: load from outside falls on them alike)."""

    def __init__(self, server: Server, model: str, system: str, n: int, max_tokens: int):
        self.server, self.model, self.max_tokens = server, model, max_tokens
        self.conversations = [[{"role": "system", "content": system},
                               {"role": "user", "content": f"Agent {n}-{i}: look at module {i} and list its tests."}]
                              for i in range(n)]
        self.walls: list[float] = []
        self.rates: list[float] = []
        self.spans: list[float] = []
        self.ttfts: list[float] = []
        self.gaps: list[float] = []

    def round(self) -> None:
        started = time.perf_counter()
        results = at_once(self.server, self.model, self.conversations, self.max_tokens)
        self.walls.append(time.perf_counter() - started)
        self.rates.append(decode_rate(results))
        first = min(s.sent + s.ttft for s in results)
        last = max(s.sent + (s.arrivals[-1] if s.arrivals else s.ttft) for s in results)
        tokens = sum(s.completion_tokens for s in results)
        self.spans.append(tokens / (last - first) if last > first else 0.0)
        self.ttfts += [s.ttft for s in results]
        self.gaps += [s.longest_gap for s in results]
        for conversation, s in zip(self.conversations, results):
            conversation += [{"role": "assistant", "content": s.text},
                             {"role": "user", "content": f"Round {len(self.walls)}: now run them."}]

    def summary(self) -> dict:
        return {"wall_per_round": statistics.mean(self.walls), "decode_tokens_per_s": statistics.mean(self.rates),
                "first_to_last_tokens_per_s": statistics.mean(self.spans),
                "ttft_p50": percentile(self.ttfts, 0.5), "ttft_p95": percentile(self.ttfts, 0.95),
                "longest_gap": max(self.gaps)}


def decode_rate(results: list[Stream]) -> float:
    """Tokens per second in the span where every stream decodes: from the last stream's second
    token (a first token is its prompt's last forward pass, computed with the prefill) to the
    first stream's last (streams served one at a time never overlap: then the last stream's
    own decode). A chunk carries one token's text or several (the bytes of one character):
    each stream's chunks in the span count as that share of its tokens."""
    streams = [s for s in results if len(s.arrivals) > 1]
    if not streams:
        return 0.0
    start = max(s.sent + s.arrivals[1] for s in streams)
    end = min(s.sent + s.arrivals[-1] for s in streams)
    if end <= start:
        end = max(s.sent + s.arrivals[-1] for s in streams)
    tokens = sum(s.completion_tokens * sum(1 for a in s.arrivals if start < s.sent + a <= end) / len(s.arrivals)
                 for s in streams)
    return tokens / (end - start) if end > start else 0.0


def run_long_prefill(server: Server, model: str, system: str, long_text: str, max_tokens: int) -> dict:
    """One stream decodes while a cold long prompt arrives: the stream's longest gap between
    two chunks while that prompt is prefilled (from its sending to its first token)."""
    out: dict = {}
    decoding = threading.Event()

    def decode() -> None:
        out["stream"] = stream(server, model, [{"role": "system", "content": system},
                                               {"role": "user", "content": "Write a long plan."}],
                               max_tokens, decoding)

    thread = threading.Thread(target=decode)
    thread.start()
    decoding.wait()
    time.sleep(0.05)
    long_request = stream(server, model, [{"role": "user", "content": long_text}], 4)
    thread.join()
    running = out["stream"]
    window = (long_request.sent - running.sent, long_request.sent - running.sent + long_request.ttft)
    times = [t for t in running.arrivals]
    inside = [b - a for a, b in zip(times, times[1:]) if b > window[0] and a < window[1]]
    return {"longest_gap": max(inside, default=0.0), "long_request_ttft": long_request.ttft,
            "stream_ran_through": bool(times) and times[-1] > window[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 1, 2, 4; 2 rounds; short prompts")
    parser.add_argument("--out", default=None, help="where benchmarks.md and bench/ are (default: docs)")
    parser.add_argument("--render", action="store_true", help="only rewrite the section from parallel.json")
    args = parser.parse_args()
    if args.render:
        out = Path(args.out) if args.out else ROOT / "docs"
        results = json.loads((out / "bench" / "parallel.json").read_text())
        write_section("parallel", render(results), out / "benchmarks.md")
        plot(results, out / "bench" / "parallel.png")
        return
    ns, rounds, max_tokens, system_tokens, long_tokens = (
        ([1, 2, 4], 2, 24, 600, 2000) if args.quick else ([1, 2, 4, 8], 3, 48, 2600, 8000))
    out = Path(args.out) if args.out else ROOT / "docs"
    model_path = make_model(ROOT / ".models" / "llama-h256-l4", MODEL["arch"], hidden=MODEL["hidden"],
                            layers=MODEL["layers"])
    import mlx_lm

    _, tokenizer = mlx_lm.load(str(model_path))
    system = system_prompt(system_tokens, tokenizer)
    systems = {n: system_prompt(system_tokens, tokenizer, project=f"project-{n}") for n in ns}
    long_text = system_prompt(long_tokens, tokenizer, project="unrelated")  # shares no prefix
    work = Path(tempfile.mkdtemp(prefix="kvtier-parallel-"))
    servers = {
        "kvtier": lambda: Server.kvtier(model_path, work / "c1", work / "kvtier.log", "--max-batch", "8"),
        "kvtier --batch-inexact": lambda: Server.kvtier(model_path, work / "c2", work / "kvtier-inexact.log",
                                                        "--max-batch", "8", "--batch-inexact"),
        "mlx_lm.server": lambda: Server.mlx_lm(model_path, work / "mlx.log"),
    }
    results = {"machine": machine_description(), "model": MODEL, "system_tokens": system_tokens,
               "rounds": rounds, "max_tokens": max_tokens, "servers": {}}
    running: dict[str, Server] = {}
    model = str(model_path)
    try:
        for name, make in servers.items():  # all up at once; an idle one waits on its queue
            server = make().start()
            running[labelled(name, server)] = server
            stream(server, model, [{"role": "user", "content": "warm up"}], 4)
        for n in ns:  # each N its own system prompt: its first round is cold, as an agent's first turn
            runs = {name: Parallel(server, model, systems[n], n, max_tokens) for name, server in running.items()}
            order = list(runs.values())
            for r in range(rounds):
                for run in order[r % len(order):] + order[:r % len(order)]:  # none always follows another
                    time.sleep(SETTLE)
                    run.round()
            for name, run in runs.items():
                results["servers"].setdefault(name, {"parallel": {}})["parallel"][n] = run.summary()
                print(name, n, run.summary(), flush=True)
        for name, server in running.items():
            prefill = run_long_prefill(server, model, system, long_text, 4000)
            print(name, "long prefill", prefill, flush=True)
            results["servers"][name]["long_prefill"] = prefill
    finally:
        for server in running.values():
            server.stop()
    results = json.loads(json.dumps(results))  # N keys as strings, as when rendered from the file
    (out / "bench").mkdir(parents=True, exist_ok=True)
    (out / "bench" / "parallel.json").write_text(json.dumps(results, indent=2))
    write_section("parallel", render(results), out / "benchmarks.md")
    plot(results, out / "bench" / "parallel.png")


def labelled(name: str, server: Server) -> str:
    """kvtier's default with the mode its start-up check chose (`/health` batching.mode)."""
    if name != "kvtier":
        return name
    with urllib.request.urlopen(server.url + "/health", timeout=30) as response:
        return f"kvtier ({json.load(response)['batching']['mode']})"


def render(results: dict) -> str:
    lines = [f"### Parallel agents ({results['machine']})", "",
             f"N conversations at once sharing a {results['system_tokens']}-token system prompt (new for each N: "
             "the first round is cold), "
             f"{results['max_tokens']} tokens each, {results['rounds']} rounds (bench/parallel.py).", "",
             "Decode tok/s: all streams' tokens while all N decode; first to last: from the round's first "
             "token to its last (late starters' prefills inside).", "",
             "| server | N | wall per round (s) | decode tok/s (all streams) | tok/s first to last "
             "| TTFT p50 (s) | TTFT p95 (s) | longest gap (s) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results["servers"].items():
        for n, m in r["parallel"].items():
            lines.append(f"| {name} | {n} | {m['wall_per_round']:.2f} | {m['decode_tokens_per_s']:.1f} "
                         f"| {_number(m.get('first_to_last_tokens_per_s'))} "
                         f"| {m['ttft_p50']:.2f} | {m['ttft_p95']:.2f} | {m['longest_gap']:.2f} |")
    lines += ["", *targets(results)]
    lines += ["", "While another request prefills a cold long prompt, the longest gap of a decoding stream:", "",
              "| server | longest gap (s) | long request TTFT (s) | stream still decoding when it got its first token |",
              "|---|---|---|---|"]
    for name, r in results["servers"].items():
        p = r["long_prefill"]
        lines.append(f"| {name} | {p['longest_gap']:.2f} | {p['long_request_ttft']:.2f} "
                     f"| {'yes' if p.get('stream_ran_through') else 'no'} |")
    return "\n".join(lines) + "\n"


def targets(results: dict) -> list[str]:
    """The issue's targets at N = 4, for each kvtier configuration against mlx_lm.server."""
    servers = results["servers"]
    theirs = servers.get("mlx_lm.server", {}).get("parallel", {}).get("4")
    if theirs is None:
        return []
    lines = ["| at N = 4 | wall time / mlx_lm.server's (target <= 0.8) | decode tok/s / mlx_lm.server's (target >= 1) "
             "| tok/s first to last / mlx_lm.server's |", "|---|---|---|---|"]
    for name, r in servers.items():
        mine = r["parallel"].get("4")
        if name != "mlx_lm.server" and mine:
            spans = (mine.get("first_to_last_tokens_per_s"), theirs.get("first_to_last_tokens_per_s"))
            lines.append(f"| {name} | {mine['wall_per_round'] / theirs['wall_per_round']:.2f} "
                         f"| {mine['decode_tokens_per_s'] / theirs['decode_tokens_per_s']:.2f} "
                         f"| {_number(spans[0] / spans[1] if None not in spans else None, 2)} |")
    return lines


def _number(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in results["servers"].items():
        ns = [int(n) for n in r["parallel"]]
        axes[0].plot(ns, [m["wall_per_round"] for m in r["parallel"].values()], marker="o", label=name)
        axes[1].plot(ns, [m["decode_tokens_per_s"] for m in r["parallel"].values()], marker="o", label=name)
    axes[0].set(xlabel="parallel conversations", ylabel="wall time per round (s)")
    axes[1].set(xlabel="parallel conversations", ylabel="decode tokens/s, all streams")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
