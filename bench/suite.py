"""The benchmark suite: kvtier vs mlx_lm.server on one generated model and one prompt set.

Parts, all measured in one run:
  1. time to first token at several prefix lengths: cold, warm (new question), after a
     restart, and after memory pressure (kvtier only; the hot tier spilled to disk)
  2. an agent-trace replay (long system prompt with tools, tool results, suffix edits,
     one restart) against both servers, and against kvtier with the cache off
  3. restore bandwidth from SSD vs a raw sequential read of the same block files
  4. decode tokens/s in-process: kvtier's Engine vs mlx_lm.stream_generate
  5. large caches at 1K/10K/100K blocks: start-up, lookup, stats, ls, verify, purge,
     eviction (bench/scale.py)
  6. memory of the hot tier and a live cache against their raw KV bytes (bench/memory.py)

Writes OUT/bench/suite.json, OUT/bench/suite_*.png and the `suite` section of
OUT/benchmarks.md (OUT = docs/ by default; a temp dir with --quick).
    make bench            (or: python bench/suite.py [--quick])
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from harness import (_NOUNS, _VERBS, ROOT, Server, Timed, agent_system_prompt, machine_description,
                     stream_chat, write_section)
from ttft import QUESTIONS, messages_for

import memory
import scale

FULL = {"lengths": "1024,4096,8192,16384", "agent_system_tokens": 10000, "agent_requests": 40,
        "decode_tokens": 256}
QUICK = {"lengths": "512,1024", "agent_system_tokens": 1500, "agent_requests": 12, "decode_tokens": 64}
NO_PRESSURE = "n/a (no pressure response; keeps its RAM cache or evicts it)"
SCENARIOS = [("cold", "cold"), ("warm", "warm, new question"), ("after_restart", "after restart"),
             ("after_pressure", "after memory pressure")]
EDIT_EVERY = 8  # agent trace: a retry or a compaction every this many requests
BASELINE_EVERY = 5  # no-cache baseline: measure every 5th request, interpolate the rest


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def cached_tokens(usage: dict) -> int:
    return (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0


def record(timed: Timed) -> dict:
    """The raw numbers of one streamed request, as stored in suite.json."""
    return {"ttft": round(timed.ttft, 4), "prompt_tokens": timed.usage.get("prompt_tokens"),
            "cached_tokens": cached_tokens(timed.usage), "kvtier": timed.usage.get("kvtier"),
            "text": timed.text}


# -- 1. time to first token by prefix length ------------------------------------------------
def warm_up(server: Server, model: str) -> None:
    """One short unrelated request after each (re)start: MLX's first-call set-up (kernels,
    buffers) would otherwise land in whichever scenario happens to come first."""
    stream_chat(server, model, [{"role": "user", "content": "Say hi."}], max_tokens=2)


def length_systems(lengths: list[int], tokenizer) -> dict[int, str]:
    # A project name and seed per length: the shorter prompts are not prefixes of the longer
    # ones (same-seed tool lists would be), so each length's cold request is really cold.
    return {n: agent_system_prompt(n, tokenizer, project=f"project{n}", seed=n, step=1) for n in lengths}


def ttft_by_length(server: Server, model: str, systems: dict[int, str]) -> dict[str, dict]:
    """cold and warm per length, then one restart and the after-restart request per length."""
    out: dict[str, dict] = {"cold": {}, "warm": {}, "after_restart": {}}
    server.start()
    try:
        warm_up(server, model)
        for n, system in systems.items():
            log(f"  {server.name} {n}: cold, warm")
            out["cold"][str(n)] = record(stream_chat(server, model, messages_for(system, QUESTIONS[0])))
            out["warm"][str(n)] = record(stream_chat(server, model, messages_for(system, QUESTIONS[1])))
        server.restart()
        warm_up(server, model)
        for n, system in systems.items():
            log(f"  {server.name} {n}: after restart")
            out["after_restart"][str(n)] = record(stream_chat(server, model, messages_for(system, QUESTIONS[2])))
    finally:
        server.stop()
    return out


def wait_until_spilled(server: Server, timeout: float = 120) -> tuple[bool, float]:
    """Wait for the pressure watcher to empty the hot tier and the write queue to drain, so
    the next request can only find its prefix on disk."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        stats = server.stats()
        if stats["ram"]["bytes"] == 0 and not stats["disk"].get("queued_bytes"):
            return True, time.perf_counter() - started
        time.sleep(0.25)
    return False, time.perf_counter() - started


def ttft_after_pressure(server: Server, model: str, systems: dict[int, str]) -> dict[str, dict]:
    out: dict[str, dict] = {"cold": {}, "after_pressure": {}}
    server.start()
    try:
        warm_up(server, model)
        for n, system in systems.items():
            log(f"  kvtier under pressure {n}: cold, spill, next request")
            out["cold"][str(n)] = record(stream_chat(server, model, messages_for(system, QUESTIONS[0])))
            spilled, waited = wait_until_spilled(server)
            timed = record(stream_chat(server, model, messages_for(system, QUESTIONS[1])))
            out["after_pressure"][str(n)] = dict(timed, spilled=spilled, spill_wait_seconds=round(waited, 2))
    finally:
        server.stop()
    return out


def run_ttft(model: Path, systems: dict[int, str], work: Path) -> dict:
    log("part 1: time to first token by prefix length")
    kv = ttft_by_length(Server.kvtier(model, work / "ttft-cache", work / "ttft-kvtier.log"), str(model), systems)
    pressure = ttft_after_pressure(
        Server.kvtier(model, work / "pressure-cache", work / "pressure.log",
                      "--pressure-below", "1000TB", "--pressure-keep", "0"), str(model), systems)
    ml = ttft_by_length(Server.mlx_lm(model, work / "ttft-mlx.log"), str(model), systems)
    kv["after_pressure"] = pressure["after_pressure"]
    kv["cold_pressure_run"] = pressure["cold"]
    ml["after_pressure"] = NO_PRESSURE
    return {"lengths": [int(n) for n in systems], "kvtier": kv, "mlx_lm.server": ml,
            "server_args": {"after_pressure": ["--pressure-below", "1000TB", "--pressure-keep", "0"]}}


# -- 2. agent-trace replay ---------------------------------------------------------------------
@dataclass
class TraceRequest:
    label: str
    messages: list[dict]


def _words(rng: random.Random) -> tuple[str, str, str]:
    return rng.choice(_VERBS), rng.choice(_NOUNS), rng.choice(_NOUNS)


def _listing_line(rng: random.Random) -> str:
    verb, noun, other = _words(rng)
    return (f"-rw-r--r--  1 dev  staff  {rng.randint(200, 90000):>6} Nov {rng.randint(1, 28):>2} "
            f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d} src/{noun}/{verb}_{other}.py")


def _test_line(rng: random.Random) -> str:
    verb, noun, other = _words(rng)
    status = rng.choice(["PASSED", "PASSED", "PASSED", "FAILED", "SKIPPED"])
    return f"tests/test_{noun}.py::test_{verb}_{other} {status} [{rng.randint(1, 100):>3}%]"


def _code_line(rng: random.Random) -> str:
    verb, noun, other = _words(rng)
    return (f"    def {verb}_{noun}(self, {other}: int = {rng.randint(0, 99)}) -> "
            f"{rng.choice(['int', 'str', 'bool', 'None'])}:\n"
            f"        return self.{other}_{verb}({other}) + {rng.randint(1, 9)}")


def _grep_line(rng: random.Random) -> str:
    verb, noun, other = _words(rng)
    return (f"src/{noun}/{verb}.py:{rng.randint(1, 900)}:    {other} = {verb}_{noun}({other}, "
            f"strict={rng.choice(['True', 'False'])})")


TOOL_OUTPUTS: list[Callable[[random.Random], str]] = [_listing_line, _test_line, _code_line, _grep_line]


def tool_output(rng: random.Random, tokenizer) -> str:
    """A few hundred tokens of deterministic tool output: a listing, tests, code or grep hits."""
    make, target = rng.choice(TOOL_OUTPUTS), rng.randint(150, 400)
    lines: list[str] = []
    while len(tokenizer.encode("\n".join(lines))) < target:
        lines += [make(rng) for _ in range(4)]
    return "\n".join(lines)


def tool_call(rng: random.Random, prefix: str = "Let me") -> dict:
    verb, noun, other = _words(rng)
    args = json.dumps({f"{other}_0": f"src/{noun}/{verb}.py", "limit": rng.randint(10, 200)})
    return {"role": "assistant", "content": f"{prefix} {verb} the {noun}: calling `{verb}_{noun}` with {args}."}


def edit(messages: list[dict], number: int, rng: random.Random, tokenizer) -> tuple[str, list[dict]]:
    """Invalidate a suffix like an agent does: odd edits retry (drop the last two tool rounds
    and redo one differently), even edits compact (summarise everything after the task)."""
    if number % 2:
        kept = messages[:max(2, len(messages) - 4)]
        return "retry", kept + [tool_call(rng, "Retrying differently, I will"),
                                {"role": "tool", "content": tool_output(rng, tokenizer)}]
    verb, noun, other = _words(rng)
    summary = (f"Summary of the work so far: we inspected the {noun} and {other} modules, "
               f"changed how they {verb} data, and ran the tests; {rng.randint(1, 9)} still fail. "
               "Continue from here.")
    return "compaction", messages[:2] + [{"role": "user", "content": summary}]


def build_trace(system: str, tokenizer, count: int, seed: int = 11) -> list[TraceRequest]:
    """A coding-agent session: task, then tool calls with their results, a user nudge now and
    then, and every EDIT_EVERY requests an edit of the suffix. Fixed, so every server (and the
    no-cache baseline) sees exactly the same message lists."""
    rng = random.Random(seed)
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": "The checkout tests fail after the refactor; find out why and fix it."}]
    trace = [TraceRequest("first request", list(messages))]
    for i in range(1, count):
        if i % EDIT_EVERY == 0:
            label, messages = edit(messages, i // EDIT_EVERY, rng, tokenizer)
        else:
            label = "tool result"
            messages = messages + [tool_call(rng), {"role": "tool", "content": tool_output(rng, tokenizer)}]
            if i % 5 == 3:
                verb, noun, _ = _words(rng)
                label, messages = "user turn", messages + [
                    {"role": "user", "content": f"Good. Now {verb} the {noun} too and keep the tests green."}]
        trace.append(TraceRequest(label, list(messages)))
    return trace


def replay(server: Server, model: str, trace: list[TraceRequest], indices: list[int],
           restart_before: int | None) -> list[dict]:
    """Send trace[i] for i in indices, restarting the server once before `restart_before`."""
    out = []
    server.start()
    try:
        for i in indices:
            if i == restart_before:
                log(f"  {server.name}: restart before request {i + 1}")
                server.restart()
            timed = stream_chat(server, model, trace[i].messages)
            label = "after restart" if i == restart_before else trace[i].label
            out.append(dict(record(timed), index=i, label=label))
    finally:
        server.stop()
    return out


def summarise_replay(records: list[dict]) -> dict:
    prompt = sum(r["prompt_tokens"] or 0 for r in records)
    cached = sum(r["cached_tokens"] for r in records)
    return {"requests": len(records), "prompt_tokens": prompt, "cached_tokens": cached,
            "hit_rate": cached / prompt if prompt else 0.0,
            "requests_with_reuse": sum(1 for r in records if r["cached_tokens"] > 0),
            "total_ttft": sum(r["ttft"] for r in records)}


def interpolate(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear through the measured points, extended along the end segments."""
    points = sorted(zip(xs, ys))
    if len(points) == 1:
        return points[0][1]
    if x <= points[0][0]:
        (x0, y0), (x1, y1) = points[0], points[1]
    elif x >= points[-1][0]:
        (x0, y0), (x1, y1) = points[-2], points[-1]
    else:
        (x0, y0), (x1, y1) = next((a, b) for a, b in zip(points, points[1:]) if a[0] <= x <= b[0])
    return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def baseline_indices(prompt_tokens: list[int]) -> list[int]:
    # Every 5th request, plus the shortest and the longest prompt: interpolation, never
    # extrapolation from two close, noisy points.
    ends = {prompt_tokens.index(min(prompt_tokens)), prompt_tokens.index(max(prompt_tokens))}
    return sorted({*range(0, len(prompt_tokens), BASELINE_EVERY), *ends})


def no_cache_estimate(measured: list[dict], lengths: list[int]) -> list[float]:
    xs = [r["prompt_tokens"] for r in measured]
    ys = [r["ttft"] for r in measured]
    return [interpolate(xs, ys, n) for n in lengths]


def run_agent(model: Path, tokenizer, system_tokens: int, count: int, work: Path) -> dict:
    log(f"part 2: agent-trace replay, {count} requests, ~{system_tokens}-token system prompt")
    system = agent_system_prompt(system_tokens, tokenizer, project="agent-trace", seed=7, step=1)
    trace = build_trace(system, tokenizer, count)
    every, restart_at = list(range(count)), count // 2
    kv = replay(Server.kvtier(model, work / "agent-cache", work / "agent-kvtier.log"), str(model),
                trace, every, restart_at)
    ml = replay(Server.mlx_lm(model, work / "agent-mlx.log"), str(model), trace, every, restart_at)
    subset = baseline_indices([r["prompt_tokens"] for r in kv])
    log(f"  no-cache baseline on {len(subset)} of {count} requests")
    nc = replay(Server.kvtier(model, work / "nocache-cache", work / "nocache.log",
                              "--ram-budget", "0", "--disk-budget", "0"), str(model), trace, subset, None)
    estimate = no_cache_estimate(nc, [r["prompt_tokens"] for r in kv])
    return {"requests": count, "system_tokens": system_tokens, "restart_before_request": restart_at + 1,
            "edit_every": EDIT_EVERY, "labels": [t.label for t in trace],
            "kvtier": {"records": kv, "summary": summarise_replay(kv)},
            "mlx_lm.server": {"records": ml, "summary": summarise_replay(ml)},
            "no_cache": {"server_args": ["--ram-budget", "0", "--disk-budget", "0"],
                         "measured": nc, "measured_indices": subset,
                         "estimated_ttft": [round(t, 4) for t in estimate],
                         "estimated_total_ttft": sum(estimate),
                         "method": "piecewise-linear interpolation of TTFT over prompt tokens"},
            "identical_texts": sum(a["text"] == b["text"] for a, b in zip(kv, ml))}


# -- 3. restore bandwidth ---------------------------------------------------------------------
def page_cache_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("Cached:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def drop_page_cache() -> dict:
    """Best effort (needs root on Linux): both reads below should come from the device."""
    before = page_cache_mb()
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        ok, error = True, None
    except OSError as exc:
        ok, error = False, str(exc)
    return {"ok": ok, "error": error, "page_cache_mb_before": before, "page_cache_mb_after": page_cache_mb()}


def raw_read(root: Path, chunk: int = 64 << 20) -> dict:
    """Sequential read of every block file with large reads: the device's bandwidth."""
    buffer = memoryview(bytearray(chunk))
    files, total = sorted(root.rglob("*.safetensors")), 0
    started = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    seconds = time.perf_counter() - started
    return {"files": len(files), "bytes": total, "seconds": seconds, "gb_per_s": total / seconds / 1e9}


def run_restore(model: Path, system: str, work: Path) -> dict:
    log("part 3: restore bandwidth from SSD vs a raw read of the block files")
    cache = work / "restore-cache"
    server = Server.kvtier(model, cache, work / "restore.log")
    server.start()
    try:
        warm_up(server, str(model))
        cold = record(stream_chat(server, str(model), messages_for(system, QUESTIONS[0])))
    finally:
        server.stop()  # writes every block before exiting
    server.start()
    try:
        warm_up(server, str(model))
        restore_drop = drop_page_cache()  # after start: the model load is not what we time
        restored = record(stream_chat(server, str(model), messages_for(system, QUESTIONS[3])))
    finally:
        server.stop()
    raw_drop = drop_page_cache()
    raw = raw_read(cache / "blocks")
    k = restored["kvtier"] or {}
    bandwidth = k.get("restored_bytes", 0) / k["restore_seconds"] / 1e9 if k.get("restore_seconds") else 0.0
    return {"cold": cold, "restored": restored, "restore_gb_per_s": bandwidth, "raw_read": raw,
            "ratio": bandwidth / raw["gb_per_s"] if raw["gb_per_s"] else 0.0,
            "drop_caches": {"before_restore": restore_drop, "before_raw_read": raw_drop}}


# -- 4. decode tokens/s ---------------------------------------------------------------------
def time_mlx_lm(model, tokenizer, prompt: list[int], max_tokens: int) -> dict:
    from mlx_lm import stream_generate

    first = last = 0.0
    response, parts = None, []
    for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        last = time.perf_counter()
        first = first or last
        parts.append(response.text)
    tokens = response.generation_tokens
    return {"tokens": tokens, "finish": response.finish_reason, "seconds": last - first,
            "tps": (tokens - 1) / (last - first), "reported_tps": response.generation_tps,
            "text": "".join(parts)}


def time_engine(engine, prompt: list[int], max_tokens: int) -> dict:
    from kvtier.engine import GenerationRequest

    first = last = 0.0
    chunk, parts = None, []
    for chunk in engine.generate(GenerationRequest(list(prompt), max_tokens, temperature=0.0)):
        last = time.perf_counter()
        first = first or last
        parts.append(chunk.text)
    engine.store.flush()  # its background disk writes must not overlap the next timing
    tokens = chunk.usage.completion_tokens
    return {"tokens": tokens, "finish": chunk.finish_reason, "seconds": last - first,
            "tps": (tokens - 1) / (last - first), "text": "".join(parts)}


def pick_decode_prompt(engine, model, tokenizer, max_tokens: int, attempts: int = 6) -> tuple[list[int], int]:
    """A ~1K-token prompt on which greedy decoding does not hit EOS before max_tokens (this
    run doubles as mlx-lm's warm-up)."""
    for seed in range(attempts):
        system = agent_system_prompt(1000, engine.tokenizer, project=f"decode{seed}", seed=100 + seed,
                                     step=1)
        prompt = engine.chat_tokens(messages_for(system, QUESTIONS[seed % len(QUESTIONS)]))
        if time_mlx_lm(model, tokenizer, prompt, max_tokens)["tokens"] == max_tokens:
            return prompt, seed
    raise RuntimeError(f"every candidate prompt stopped at EOS before {max_tokens} tokens")


def run_decode(model_path: Path, max_tokens: int, repeats: int, work: Path) -> dict:
    log(f"part 4: decode tokens/s, {max_tokens} greedy tokens, in-process")
    from mlx_lm import load

    from kvtier.config import CacheConfig
    from kvtier.engine import Engine

    model, tokenizer = load(str(model_path))
    engine = Engine(str(model_path), CacheConfig(cache_dir=work / "decode-cache"))
    try:
        prompt, seed = pick_decode_prompt(engine, model, tokenizer, max_tokens)
        time_engine(engine, prompt, 8)  # warm-up
        mlx_runs, engine_runs = [], []
        for _ in range(repeats):  # interleaved, so background load hits both alike
            mlx_runs.append(time_mlx_lm(model, tokenizer, prompt, max_tokens))
            engine_runs.append(time_engine(engine, prompt, max_tokens))
    finally:
        engine.close()
    mlx_tps = statistics.median(r["tps"] for r in mlx_runs)
    engine_tps = statistics.median(r["tps"] for r in engine_runs)
    # Other load shifts both runs of a pair alike: the median of paired ratios resists it best.
    ratio = statistics.median(e["tps"] / m["tps"] for m, e in zip(mlx_runs, engine_runs))
    return {"prompt_tokens": len(prompt), "prompt_seed": seed, "max_tokens": max_tokens, "repeats": repeats,
            "mlx_lm": mlx_runs, "kvtier": engine_runs, "mlx_lm_tps": mlx_tps, "kvtier_tps": engine_tps,
            "ratio": ratio,
            "same_token_counts": all(r["tokens"] == max_tokens for r in mlx_runs + engine_runs),
            "identical_texts": len({r["text"] for r in mlx_runs + engine_runs}) == 1}


# -- targets -------------------------------------------------------------------------------
def restart_ratio(ttft: dict, n: int) -> float:
    kv = ttft["kvtier"]
    return kv["after_restart"][str(n)]["ttft"] / kv["cold"][str(n)]["ttft"]


def reference_lengths(lengths: list[int]) -> tuple[int, int]:
    # The length nearest 4K (among all but the largest, when there are several) and the largest.
    candidates = sorted(lengths)[:-1] or lengths
    return min(candidates, key=lambda n: abs(n - 4096)), max(lengths)


def evaluate(results: dict) -> list[dict]:
    ttft, agent = results["ttft"], results["agent"]
    ref, big = reference_lengths(ttft["lengths"])
    checks = [(f"after restart <= 10% of cold at {ref} tokens", restart_ratio(ttft, ref), "<= 10%",
               restart_ratio(ttft, ref) <= 0.10)]
    if big != ref:
        checks.append((f"after restart at {big} tokens lower (share of cold) than at {ref}",
                       restart_ratio(ttft, big), f"< {100 * restart_ratio(ttft, ref):.1f}%",
                       restart_ratio(ttft, big) < restart_ratio(ttft, ref)))
    kv = agent["kvtier"]["summary"]
    share = kv["total_ttft"] / agent["no_cache"]["estimated_total_ttft"]
    checks += [("restore bandwidth >= 50% of raw read", results["restore"]["ratio"], ">= 50%",
                results["restore"]["ratio"] >= 0.5),
               ("agent replay hit rate >= 90%", kv["hit_rate"], ">= 90%", kv["hit_rate"] >= 0.9),
               ("agent replay total TTFT <= 15% of no cache", share, "<= 15%", share <= 0.15),
               ("decode >= 95% of mlx-lm", results["decode"]["ratio"], ">= 95%", results["decode"]["ratio"] >= 0.95)]
    return [{"name": name, "value": value, "target": target, "pass": bool(ok)} for name, value, target, ok in checks]


# -- plots -------------------------------------------------------------------------------------
def plot_ttft(ttft: dict, path: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = dict(zip([key for key, _ in SCENARIOS], ["tab:red", "tab:orange", "tab:green", "tab:blue"]))
    for server, style in (("kvtier", "-o"), ("mlx_lm.server", "--s")):
        for key, label in SCENARIOS:
            series = ttft[server].get(key)
            if not isinstance(series, dict):
                continue
            xs = [series[str(n)]["prompt_tokens"] for n in ttft["lengths"]]
            ax.plot(xs, [series[str(n)]["ttft"] for n in ttft["lengths"]], style, color=colors[key],
                    label=f"{server}: {label}")
    ax.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="time to first token (s)",
           title="Time to first token by prefix length")
    ticks = [ttft["kvtier"]["cold"][str(n)]["prompt_tokens"] for n in ttft["lengths"]]
    ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())  # log-axis minor labels would clutter the lengths
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_agent(agent: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    kv, ml, nc = agent["kvtier"]["records"], agent["mlx_lm.server"]["records"], agent["no_cache"]
    xs = [r["index"] + 1 for r in kv]
    ax.plot(xs, nc["estimated_ttft"], ":", color="gray", label="no cache (interpolated)")
    ax.plot([r["index"] + 1 for r in nc["measured"]], [r["ttft"] for r in nc["measured"]], "x", color="black",
            label="no cache (measured)")
    ax.plot(xs, [r["ttft"] for r in ml], "--s", markersize=4, label="mlx_lm.server")
    ax.plot(xs, [r["ttft"] for r in kv], "-o", markersize=4, label="kvtier")
    for r in kv:
        if r["label"] in ("retry", "compaction", "after restart"):
            ax.axvline(r["index"] + 1, color="tab:red" if r["label"] == "after restart" else "tab:purple",
                       alpha=0.3, linestyle="--")
    ax.set(yscale="log", xlabel="request (dashed lines: red = restart, purple = retry/compaction)",
           ylabel="time to first token (s)", title="Agent-trace replay, per request")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- report ------------------------------------------------------------------------------------
def table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"] + \
           ["| " + " | ".join(row) + " |" for row in rows]


def render_ttft(ttft: dict) -> list[str]:
    lengths = ttft["lengths"]
    header = ["scenario", "server"] + [f"{ttft['kvtier']['cold'][str(n)]['prompt_tokens']:,} tok" for n in lengths]
    rows = []
    for key, label in SCENARIOS:
        for server in ("kvtier", "mlx_lm.server"):
            series, cold = ttft[server][key], ttft[server]["cold"]
            if isinstance(series, str):
                rows.append([label, server] + [series] + [""] * (len(lengths) - 1))
                continue
            rows.append([label, server] + [f"{series[str(n)]['ttft']:.3f} s "
                                           f"({100 * series[str(n)]['ttft'] / cold[str(n)]['ttft']:.1f}%)"
                                           for n in lengths])
    return table(header, rows, ["---", "---"] + ["---:"] * len(lengths))


def render_agent(agent: dict) -> list[str]:
    kv, ml = agent["kvtier"]["summary"], agent["mlx_lm.server"]["summary"]
    nc = agent["no_cache"]
    total = nc["estimated_total_ttft"]
    rows = [["kvtier", f"{kv['total_ttft']:.2f} s", f"{100 * kv['total_ttft'] / total:.1f}%",
             f"{100 * kv['hit_rate']:.1f}%", f"{kv['requests_with_reuse']} of {kv['requests']}"],
            ["mlx_lm.server", f"{ml['total_ttft']:.2f} s", f"{100 * ml['total_ttft'] / total:.1f}%",
             f"{100 * ml['hit_rate']:.1f}%", f"{ml['requests_with_reuse']} of {ml['requests']}"],
            ["no cache (estimated)", f"{total:.2f} s", "100%", "0%", "0"]]
    return table(["", "total TTFT", "% of no cache", "prompt tokens from cache", "requests with reuse"],
                 rows, ["---", "---:", "---:", "---:", "---:"]) + [
        "", f"The no-cache total is interpolated from {len(nc['measured'])} measured points: requests "
            f"{', '.join(str(i + 1) for i in nc['measured_indices'])} (every {BASELINE_EVERY}th, plus the "
            f"shortest and longest prompt) replayed on kvtier with `{' '.join(nc['server_args'])}`, the "
            "others estimated by piecewise-linear interpolation of TTFT over prompt length.",
        f"Greedy texts identical between kvtier and mlx_lm.server on {agent['identical_texts']} of "
        f"{agent['requests']} requests; mlx_lm.server's cache figures are its own `cached_tokens`."]


def render_restore(restore: dict) -> list[str]:
    k, raw = restore["restored"]["kvtier"] or {}, restore["raw_read"]
    drops = restore["drop_caches"]
    dropped = "worked" if all(d["ok"] for d in drops.values()) else \
        f"failed ({drops['before_restore']['error']}); both reads may come from the page cache"
    rows = [["kvtier restore (after restart)", f"{k.get('restored_bytes', 0) / 1e6:.1f} MB",
             f"{k.get('restore_seconds', 0):.3f} s", f"{restore['restore_gb_per_s']:.2f} GB/s"],
            [f"raw sequential read ({raw['files']} files)", f"{raw['bytes'] / 1e6:.1f} MB",
             f"{raw['seconds']:.3f} s", f"{raw['gb_per_s']:.2f} GB/s"]]
    return table(["", "bytes", "time", "bandwidth"], rows, ["---", "---:", "---:", "---:"]) + [
        "", f"Restore = {100 * restore['ratio']:.0f}% of the raw read. The restoring request's TTFT: "
            f"{restore['restored']['ttft']:.3f} s ({k.get('disk_tokens', 0)} tokens from disk; cold "
            f"{restore['cold']['ttft']:.3f} s). Page cache dropped before each (`echo 3 > "
            f"/proc/sys/vm/drop_caches`): {dropped}."]


def render_decode(decode: dict) -> list[str]:
    rows = [["mlx_lm.stream_generate", f"{decode['mlx_lm_tps']:.1f}", "100%"],
            ["kvtier Engine.generate", f"{decode['kvtier_tps']:.1f}", f"{100 * decode['ratio']:.1f}%"]]
    return table(["", "decode tokens/s (median)", "% of mlx-lm (median of paired ratios)"], rows,
                 ["---", "---:", "---:"]) + [
        "", f"{decode['max_tokens']} greedy tokens after a {decode['prompt_tokens']}-token prompt, "
            f"{decode['repeats']} interleaved pairs of runs, timed from the first streamed token to the last. "
            f"Both ran to max_tokens: {'yes' if decode['same_token_counts'] else 'NO'}; identical texts: "
            f"{'yes' if decode['identical_texts'] else 'NO'}."]


def render_targets(checks: list[dict]) -> list[str]:
    rows = [[c["name"], c.get("shown") or f"{100 * c['value']:.1f}%", c["target"], "pass" if c["pass"] else "FAIL"]
            for c in checks]
    return table(["target", "measured", "needed", "result"], rows, ["---", "---:", "---:", "---"])


def render(results: dict) -> str:
    ttft, agent = results["ttft"], results["agent"]
    return "\n".join([
        "## Benchmark suite: kvtier vs mlx_lm.server", "",
        f"Measured {results['date']} on {results['machine']}.",
        f"Model: generated llama, hidden 512, 8 layers, float32 (`{results['model']}`). "
        f"Command: `{results['command']}` ({results['seconds'] / 60:.1f} min).", "",
        "### Targets", "", *render_targets(results["targets"]), "",
        "### Time to first token by prefix length", "",
        "Client-side TTFT of streamed requests, one server at a time; % of that server's cold request. "
        "Warm: same system prompt, new question. After memory pressure: a separate kvtier run with "
        "`--pressure-below 1000TB --pressure-keep 0`, timed once `/cache/stats` shows an empty hot tier. "
        "Each server answers one short unrelated request after every start before anything is timed. "
        "The after-restart requests read block files the OS may still hold in its page cache.", "",
        *render_ttft(ttft), "", "![TTFT by prefix length](bench/suite_ttft.png)", "",
        "### Agent-trace replay", "",
        f"{agent['requests']} requests of a coding-agent session: a ~{agent['system_tokens']}-token system "
        "prompt with tool definitions, tool calls with tool results of a few hundred tokens, a retry or a "
        f"compaction every {agent['edit_every']} requests, each server restarted before request "
        f"{agent['restart_before_request']}. Replayed as an agent sends it: no warm-up requests, "
        "and the same fixed message lists for every server.", "",
        *render_agent(agent), "", "![Agent replay TTFT per request](bench/suite_agent.png)", "",
        "### Restore bandwidth from SSD", "", *render_restore(results["restore"]), "",
        "### Decode speed (in-process)", "", *render_decode(results["decode"]), "",
        "### Large caches (bench/scale.py)", "", *scale.table(results["scale"]), "",
        "### Memory (bench/memory.py)", "", *memory.table(results["memory"]),
    ])


# -- main --------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes for a smoke run; writes to a temp dir unless --out is given")
    parser.add_argument("--lengths", help=f"prefix lengths for part 1 (default {FULL['lengths']})")
    parser.add_argument("--agent-system-tokens", type=int, help="default 10000")
    parser.add_argument("--agent-requests", type=int, help="default 40")
    parser.add_argument("--decode-tokens", type=int, help="default 256")
    parser.add_argument("--decode-repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="where benchmarks.md and bench/ go (default docs/)")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.lengths = sorted(int(n) for n in str(args.lengths).split(","))
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="kvtier-suite-")) if args.quick else ROOT / "docs"
    return args


def write_outputs(results: dict, out: Path) -> None:
    (out / "bench").mkdir(parents=True, exist_ok=True)
    (out / "bench" / "suite.json").write_text(json.dumps(results, indent=2))
    plot_ttft(results["ttft"], out / "bench" / "suite_ttft.png")
    plot_agent(results["agent"], out / "bench" / "suite_agent.png")
    write_section("suite", render(results), out / "benchmarks.md")


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from transformers import AutoTokenizer

    from kvtier.testmodels import make_model

    started = time.perf_counter()
    model = make_model(ROOT / ".models" / "llama", "llama")
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    systems = length_systems(args.lengths, tokenizer)
    work = Path(tempfile.mkdtemp(prefix="kvtier-suite-work-"))
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": machine_description(),
                               "model": ".models/llama", "command": "python bench/suite.py " + " ".join(sys.argv[1:]),
                               "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    try:
        results["ttft"] = run_ttft(model, systems, work)
        results["agent"] = run_agent(model, tokenizer, args.agent_system_tokens, args.agent_requests, work)
        results["restore"] = run_restore(model, systems[max(args.lengths)], work)
        results["decode"] = run_decode(model, args.decode_tokens, args.decode_repeats, work)
        results["scale"] = scale.run(scale.QUICK_SIZES if args.quick else scale.SIZES)
        results["memory"] = memory.run(work / "memory")
    except BaseException:
        log(f"failed; server logs and caches kept in {work}")
        raise
    shutil.rmtree(work, ignore_errors=True)
    results["targets"] = evaluate(results) + results["scale"]["targets"] + results["memory"]["targets"]
    results["seconds"] = time.perf_counter() - started
    write_outputs(results, args.out)
    print(render(results))
    log(f"wrote {args.out / 'bench' / 'suite.json'}, plots and {args.out / 'benchmarks.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
