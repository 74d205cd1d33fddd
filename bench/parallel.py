"""Parallel requests: kvtier's configurations vs mlx_lm.server, side by side in one run (issue 33).

All servers run at once on the same generated model and take turns (a rotating order, a
pause between two), so other load on the machine falls on them alike. Measured:
  1. aggregate decode tok/s at N = 1/2/4/8 streams (128 tokens each, short warm prompts):
     all streams' tokens after their first, from the first one's first text to the last
     one's end of response; then, in the same trials, one 512-token stream against
     plain mlx-lm's `stream_generate` on the same prompt, for the single-stream ratio
  2. agents: N conversations x 3 rounds at N = 2/4/8, each N with a ~2K-token system prompt
     new to the server (its first round is cold), shared by the N conversations or one each;
     wall time of the rounds
  3. a cold ~8K-token prompt while 2 streams decode: the longest gap between two of their
     tokens while it prefills (its sending to its first token), and its TTFT beside them
     against its TTFT alone (another cold prompt of the same length)
Each target of issue 33 is printed as a PASS/FAIL line and written, with the numbers, to
OUT/bench/parallel.json, OUT/bench/parallel.png and the `parallel` section of OUT/benchmarks.md
(OUT = docs/; --quick: a temp dir unless --out is given). Run with OpenBLAS preloaded, as
`make bench` does, and `nice -n 10` on a shared machine.

    python bench/parallel.py [--quick] [--out DIR] [--render]
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import ROOT, Server, bench_options, command_line, log, machine_description, write_results, wrote_line
from parallel_report import plot, render, target_lines, targets
from prompts import agent_system_prompt
from tests.support.testmodels import make_model

# The suite's llama (hidden 512, 8 layers): issue 33 measured on it. A smaller model makes
# per-token HTTP work, not the forward pass, most of a decode step.
MODEL: dict = {"arch": "llama", "hidden": 512, "layers": 8}
SETTLE = 0.5  # seconds between two servers' turns: the last one's background work (disk writes) ends
# kvtier's configurations, (label, flags); each also gets --max-batch 8. The default batches;
# --exact interleaves where batched decode is not bit-identical to decoding alone.
KVTIER: list[tuple[str, list[str]]] = [("kvtier", []), ("kvtier --exact", ["--exact"])]


@dataclass(frozen=True)
class Sizes:
    ns: tuple[int, ...] = (1, 2, 4, 8)
    decode_tokens: int = 128
    single_tokens: int = 512  # the single stream against plain mlx-lm
    trials: int = 5  # aggregate decode and single stream: one slow trial of three set a median
    agent_ns: tuple[int, ...] = (2, 4, 8)
    rounds: int = 3
    agent_tokens: int = 48
    system_tokens: int = 2048
    cold_tokens: int = 8192
    decoders: int = 2
    cold_trials: int = 2


FULL = Sizes()
QUICK = Sizes(ns=(1, 4, 8), decode_tokens=64, single_tokens=256, trials=1, agent_ns=(4,), agent_tokens=24, system_tokens=1024,
              cold_tokens=4096, cold_trials=1)


# -- a streamed request, timed on the client side -------------------------------------------
@dataclass
class Stream:
    sent: float = 0.0
    ttft: float = 0.0
    arrivals: list[float] = field(default_factory=list)  # seconds since the request was sent
    tokens: list[int] = field(default_factory=list)  # tokens each arrival carried (0: not told)
    text: str = ""
    completion_tokens: int = 0
    ended: float = 0.0  # seconds since sending when the response ended (tokens without text come last too)

    def gaps_within(self, start: float, end: float) -> list[tuple[float, int]]:
        """Gaps between two chunks that overlap [start, end] (absolute perf_counter times), each
        with the tokens the later chunk carried: a token without text of its own (a partial
        UTF-8 character, a lone space) comes with the next, so one gap spans two steps."""
        times = [self.sent + a for a in self.arrivals]
        return [(b - a, n) for a, b, n in zip(times, times[1:], self.tokens[1:]) if b > start and a < end]


def stream(server: Server, model: str, messages: list[dict], max_tokens: int,
           first: threading.Event | None = None, stop: threading.Event | None = None,
           count_tokens: bool = False) -> Stream:
    """Stream a greedy chat completion; `first` is set at its first text, `stop` ends it early;
    `count_tokens` asks for log-probabilities, whose entries tell the tokens each chunk carries
    (where the server streams them: kvtier does, mlx_lm.server 0.32 does not)."""
    body = json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}, "logprobs": count_tokens})
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=3600)
    result = Stream(sent=time.perf_counter())
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{server.name}: HTTP {response.status}: {response.read()[:300]!r}")
    for raw in response:
        if stop is not None and stop.is_set():
            break
        _read_event(raw, result, first)
    result.ended = time.perf_counter() - result.sent
    conn.close()
    result.ttft = result.arrivals[0] if result.arrivals else time.perf_counter() - result.sent
    return result


def _read_event(raw: bytes, result: Stream, first: threading.Event | None) -> None:
    line = raw.decode().strip()
    if not line.startswith("data: ") or line == "data: [DONE]":
        return
    event = json.loads(line[6:])
    if event.get("usage"):
        result.completion_tokens = event["usage"].get("completion_tokens", 0)
    for choice in event.get("choices", []):
        text = choice.get("delta", {}).get("content") or ""
        if text:
            result.arrivals.append(time.perf_counter() - result.sent)
            result.tokens.append(len((choice.get("logprobs") or {}).get("content") or []))
            result.text += text
            if first is not None:
                first.set()


def at_once(server: Server, model: str, conversations: list[list[dict]], max_tokens: int) -> list[Stream]:
    results: list[Any] = [None] * len(conversations)

    def run(i: int) -> None:
        results[i] = stream(server, model, conversations[i], max_tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(conversations))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def decode_rate(results: list[Stream]) -> float:
    """All streams' tokens after their first over the span from the first stream's first text
    to the last one's end (short warm prompts: their prefills are a few ms of it). Not counted
    by text chunks: a chunk may hold several tokens' text, and tokens whose text is empty (this
    random model's, late in an answer) send none, on every server alike."""
    streams = [s for s in results if s.arrivals]
    if not streams:
        return 0.0
    start = min(s.sent + s.ttft for s in streams)
    end = max(s.sent + s.ended for s in streams)
    return sum(s.completion_tokens - 1 for s in streams) / (end - start) if end > start else 0.0


def first_to_last(one: Stream) -> float:
    """One stream's decode tok/s: its tokens after the first, from its first text to the end of
    the response."""
    return decode_rate([one])


# -- 1. aggregate decode ----------------------------------------------------------------------
def question(i: int) -> list[dict]:
    return [{"role": "system", "content": "You are a coding agent. Answer at length."},
            {"role": "user", "content": f"Stream {i}: describe module {i} of the project, file by file."}]


def plain_decode(loaded: tuple[Any, Any], tokens: int) -> float:
    """Plain mlx-lm's decode tok/s on stream 0's prompt: first to last token of stream_generate."""
    import mlx_lm

    model, tokenizer = loaded
    prompt = tokenizer.apply_chat_template(question(0), add_generation_prompt=True)
    times = [time.perf_counter() for _ in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=tokens)]
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0


def run_decode(running: dict[str, Server], model: str, loaded: tuple[Any, Any], sizes: Sizes,
               results: dict) -> None:
    names = list(running)
    for trial in range(sizes.trials):
        for n in sizes.ns:
            shift = (trial + n) % len(names)
            for name in names[shift:] + names[:shift]:  # none always follows another
                time.sleep(SETTLE)
                streams = at_once(running[name], model, [question(i) for i in range(n)], sizes.decode_tokens)
                rate = decode_rate(streams)
                results["servers"][name]["decode"].setdefault(str(n), []).append(rate)
                log(f"decode {name} N={n} trial {trial}: {rate:.1f} tok/s "
                    f"(tokens {[s.completion_tokens for s in streams]})")
        run_single(running, model, loaded, sizes, results, trial)


def run_single(running: dict[str, Server], model: str, loaded: tuple[Any, Any], sizes: Sizes,
               results: dict, trial: int) -> None:
    """One long stream per server and plain mlx-lm in-process, in turn: a long one, so a
    client thread read late on a busy machine moves the span it is timed over little."""
    turns = [*running, "plain"]
    for name in turns[trial % len(turns):] + turns[:trial % len(turns)]:
        time.sleep(SETTLE)
        if name == "plain":
            rate = plain_decode(loaded, sizes.single_tokens)
            results["plain_decode"].append(rate)
        else:
            rate = first_to_last(stream(running[name], model, question(0), sizes.single_tokens))
            results["servers"][name]["single"].append(rate)
        log(f"single stream {name} trial {trial}: {rate:.1f} tok/s")


# -- 2. agents --------------------------------------------------------------------------------
class Agents:
    """N conversations on one server, a round at a time."""

    def __init__(self, systems: list[str], tag: str):
        self.conversations = [[{"role": "system", "content": system},
                               {"role": "user", "content": f"Agent {tag}-{i}: look at module {i} and list its tests."}]
                              for i, system in enumerate(systems)]
        self.walls: list[float] = []

    def round(self, server: Server, model: str, max_tokens: int) -> None:
        started = time.perf_counter()
        results = at_once(server, model, self.conversations, max_tokens)
        self.walls.append(time.perf_counter() - started)
        for conversation, s in zip(self.conversations, results):
            conversation += [{"role": "assistant", "content": s.text},
                             {"role": "user", "content": f"Round {len(self.walls)}: now run them."}]


def run_agents(running: dict[str, Server], model: str, tokenizer: Any, sizes: Sizes, results: dict) -> None:
    for n in sizes.agent_ns:
        for kind in ("shared", "distinct"):
            # New prompts for each N and kind: every server's first round is cold.
            projects = [f"{kind}-{n}"] * n if kind == "shared" else [f"{kind}-{n}-{i}" for i in range(n)]
            cache: dict[str, str] = {}
            systems = [cache.setdefault(p, agent_system_prompt(sizes.system_tokens, tokenizer, project=p))
                       for p in projects]
            runs = {name: Agents(systems, f"{kind}-{n}") for name in running}
            names = list(runs)
            for r in range(sizes.rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    time.sleep(SETTLE)
                    runs[name].round(running[name], model, sizes.agent_tokens)
            for name, run in runs.items():
                results["servers"][name]["agents"].setdefault(kind, {})[str(n)] = run.walls
                log(f"agents {name} {kind} N={n}: {sum(run.walls):.2f} s ({', '.join(f'{w:.2f}' for w in run.walls)})")


# -- 3. a cold prompt beside decoding streams -------------------------------------------------
def cold_beside_decoders(server: Server, model: str, cold_text: str, decoders: int, decode_tokens: int) -> dict:
    """`decoders` streams decode; once all have their first token, a cold prompt arrives. The
    longest gap of any decoder while it prefills, its TTFT, and whether they still decoded."""
    first = [threading.Event() for _ in range(decoders)]
    stop = threading.Event()
    streams: list[Any] = [None] * decoders

    def decode(i: int) -> None:
        streams[i] = stream(server, model, question(100 + i), decode_tokens, first[i], stop, count_tokens=True)

    threads = [threading.Thread(target=decode, args=(i,)) for i in range(decoders)]
    for thread in threads:
        thread.start()
    for event in first:
        event.wait(600)
    time.sleep(0.3)  # a few steps of decode only
    cold = stream(server, model, [{"role": "user", "content": cold_text}], 4)
    window = (cold.sent, cold.sent + cold.ttft)
    stop.set()
    for thread in threads:
        thread.join()
    gaps = [g for s in streams for g in s.gaps_within(*window)]
    ran_through = all(s.arrivals and s.sent + s.arrivals[-1] >= window[1] for s in streams)
    # A step's stall: a gap over the steps (tokens) it spanned, where the server says how many.
    return {"longest_stall": max((gap / max(1, tokens) for gap, tokens in gaps), default=0.0),
            "longest_text_gap": max((gap for gap, _ in gaps), default=0.0), "ttft_beside": cold.ttft,
            "decoders_ran_through": ran_through}


def run_cold(running: dict[str, Server], model: str, tokenizer: Any, sizes: Sizes, results: dict) -> None:
    for trial in range(sizes.cold_trials):
        # Cold for every server (each has its own cache); the two of a trial the same length.
        alone_text, beside_text = (agent_system_prompt(sizes.cold_tokens, tokenizer, project=f"cold-{trial}-{k}",
                                                       step=16) for k in ("alone", "beside"))
        names = list(running)
        for name in names[trial % len(names):] + names[:trial % len(names)]:
            server = running[name]
            time.sleep(SETTLE)
            alone = stream(server, model, [{"role": "user", "content": alone_text}], 4)
            # Decoders run until the cold prompt's first token (then stopped): long enough at a
            # lone stream's pace for twice its TTFT alone.
            single = statistics.median(results["servers"][name]["decode"].get("1", [100.0]))
            tokens = min(20000, max(256, int(single * (2 * alone.ttft + 5))))
            time.sleep(SETTLE)
            probe = cold_beside_decoders(server, model, beside_text, sizes.decoders, tokens)
            probe["ttft_alone"] = alone.ttft
            results["servers"][name]["cold"].append(probe)
            log(f"cold {name} trial {trial}: {probe}")


# -- the run -----------------------------------------------------------------------------------
def start_servers(model_path: Path, work: Path) -> dict[str, Server]:
    """Every configuration at once (an idle one waits on its queue), each warmed up."""
    running: dict[str, Server] = {}
    try:
        for label, flags in KVTIER:
            server = Server.kvtier(model_path, work / f"cache-{len(running)}", work / f"kvtier-{len(running)}.log",
                                   "--max-batch", "8", *flags).start()
            running[label] = server
        running["mlx_lm.server"] = Server.mlx_lm(model_path, work / "mlx_lm.log").start()
        for server in running.values():
            stream(server, str(model_path), [{"role": "user", "content": "warm up"}], 4)
    except BaseException:
        stop_servers(running)
        raise
    return running


def stop_servers(running: dict[str, Server]) -> None:
    for server in running.values():
        server.stop()


def health(server: Server) -> dict:
    import urllib.request

    with urllib.request.urlopen(server.url + "/health", timeout=30) as response:
        return json.load(response)


def load_average() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def measure(sizes: Sizes, command: str) -> dict:
    import mlx_lm

    started = time.perf_counter()
    model_path = make_model(ROOT / ".models" / f"llama-h{MODEL['hidden']}-l{MODEL['layers']}", MODEL["arch"], hidden=MODEL["hidden"],
                            layers=MODEL["layers"])
    loaded = mlx_lm.load(str(model_path))
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_description(), "command": command,
                     "model": MODEL, "model_name": f"llama h{MODEL['hidden']} x{MODEL['layers']}",
                     "load": {"start": load_average()}, **asdict(sizes), "plain_decode": [], "servers": {}}
    work = Path(tempfile.mkdtemp(prefix="kvtier-parallel-"))
    running = start_servers(model_path, work)
    try:
        for name, server in running.items():
            results["servers"][name] = {"decode": {}, "single": [], "agents": {}, "cold": [],
                                        "health": health(server) if name != "mlx_lm.server" else None}
        run_decode(running, str(model_path), loaded, sizes, results)
        run_agents(running, str(model_path), loaded[1], sizes, results)
        run_cold(running, str(model_path), loaded[1], sizes, results)
    except BaseException:
        log(f"failed; server logs kept in {work}")
        raise
    finally:
        stop_servers(running)
    shutil.rmtree(work, ignore_errors=True)  # the servers' caches: hundreds of MB a run
    results["load"]["end"] = load_average()
    results["seconds"] = time.perf_counter() - started
    results = json.loads(json.dumps(results))  # N keys as strings, as when rendered from the file
    results["targets"] = targets(results)
    return results


def write(results: dict, out: Path) -> None:
    write_results("parallel", results, render, plot, out)


def main(argv: list[str] | None = None) -> int:
    args, out = bench_options("parallel", __doc__.splitlines()[0],
                              "a smoke run of a few minutes (N = 1/4/8, one trial, agents at N = 4, a 4K cold prompt)", argv)
    if args.render:
        write(json.loads((out / "bench" / "parallel.json").read_text()), out)
        return 0
    results = measure(QUICK if args.quick else FULL, command_line("parallel.py", argv))
    write(results, out)
    print("\n".join(target_lines(results["targets"])))
    log(wrote_line("parallel", results, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
