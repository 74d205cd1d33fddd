"""Where a request's time to first token goes, step by step: warm (prefix in RAM) and after a
restart (prefix on disk: the cache's files evicted from the page cache, or still in it), at
several prompt lengths, beside plain mlx-lm's compute of the same request and mlx_lm.server's
TTFT; the after-restart TTFT against the disk's floor; and the restore's bandwidth against a
raw read of the same block files.

In-process, the engine's own step timer (`Usage.steps`: buffers, hash, match, snapshot,
rebuild, prefill, first_token) times one request through the scheduler (kvtier.scheduler.generate); render is the
chat template and tokenizer (kvtier.prompt) timed around the call the routes make.
"Compute alone" is plain mlx-lm's forward passes for the same request over an mlx-lm KVCache
already holding the prefix, on `generate_step`'s schedule (the remainder but its last token,
then the last token alone: the split kvtier and mlx_lm.server make too, for the same text),
to its first token (not the next step generate_step queues first). Overhead = TTFT - that.
"One pass" is the remainder in one forward pass: less compute, but not mlx-lm's text. The
disk's floor after a restart is the warm TTFT plus a raw read of the very files the restore
read.
Through the daemon, client-side TTFT less the engine's own time to first token is what
HTTP, rendering, the queue and the first SSE write add. Each length's prefix is computed
once (cold) in-process; the daemon restarts on a copy of that cache.

    python bench/steps.py [--lengths 1024,4096,16384] [--write]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    DISK_PATH,
    ROOT,
    Server,
    command_line,
    machine_description,
    stream_chat,
    target_table,
    wait_for_prefetch,
    warm_up,
    write_result,
)
from prompts import QUESTIONS, messages_for  # noqa: E402
from scenarios.restore_bandwidth import drop_page_cache, evict_files, into_page_cache, raw_read, read_files  # noqa: E402
from scenarios.ttft_by_length import length_systems  # noqa: E402

LENGTHS, QUICK_LENGTHS = [1024, 4096, 16384], [512, 1024]
PREFETCH_TRIALS = 3  # restarts with the start-up prefetch; each length's median request is reported
STEPS = ["render", "buffers", "hash", "match", "snapshot", "account", "rebuild", "prefill",
         "first_token"]
REPEATS = 3  # warm requests per length (median); after restart is once per process by nature


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def warm_question(i: int) -> str:
    """A new question each time (the earlier ones are cached by then, as the prefix is)."""
    return f"{QUESTIONS[1]} Attempt {i + 1}."


# Asked once, untimed, after the cold request: from then on every new question of this form
# finds its start cached too, so each timed request computes the same few new tokens.
PRIMING_QUESTION = warm_question(-1)


def restart_question(i: int) -> str:
    """A new question for each request after a restart (in-process and the daemon's), of the
    warm questions' form: each computes the same few new tokens as a warm request, so their
    TTFTs compare."""
    return warm_question(2 * REPEATS + i)  # the warm ones: in-process 0..REPEATS-1, the daemon's next


# -- in-process ---------------------------------------------------------------------------------
def engine_request(engine, messages: list[dict]) -> dict:
    """One request through the engine as the routes make it: render, then the scheduler (kvtier.scheduler.generate)."""
    from kvtier.requests import GenerationRequest
    from kvtier.scheduler import generate

    engine.store.wait_for_writes()  # the last request's blocks: their writing is not this one's
    engine.store.swept.wait()  # the start-up sweep of leftover files, likewise
    started = time.perf_counter()
    tokens, boundaries = engine.renderer.render(messages)
    rendered = time.perf_counter()
    request = GenerationRequest(tokens, max_tokens=2, temperature=0.0, boundaries=boundaries)
    chunks = list(generate(engine, request))
    usage = chunks[-1].usage
    assert usage is not None  # the last chunk carries it
    steps = dict(usage.steps, render=rendered - started)
    return {"tokens": tokens, "prompt_tokens": len(tokens), "reused": usage.cached_tokens,
            "ram_tokens": usage.ram_tokens, "disk_tokens": usage.disk_tokens,
            "restored_bytes": usage.restored_bytes, "restore_seconds": usage.restore_seconds,
            "engine_ttft": usage.prefill_seconds, "ttft": steps["render"] + usage.prefill_seconds,
            "steps": steps, "text": "".join(c.text for c in chunks)}


def prefix_held(engine, prefix_cache: list, reuse: int, capacity: int) -> list:
    """A fresh mlx-lm KVCache holding the first `reuse` tokens of `prefix_cache` (copied) in
    buffers of `capacity` tokens, rounded up to KVCache's step: the size mlx-lm's own cache has
    once it holds the prompt, so the timed passes do not grow it (kvtier's caches never do)."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    from kvtier.kvstate import hold_tokens

    size = -(-capacity // KVCache.step) * KVCache.step
    cache = make_prompt_cache(engine.model)
    for layer, source in zip(cache, prefix_cache):
        held = []
        for array in source.state[:2]:
            buffer = mx.zeros(array.shape[:2] + (size,) + array.shape[3:], array.dtype)
            buffer[..., :reuse, :] = array[..., :reuse, :]
            held.append(buffer)
        hold_tokens(layer, held[0], held[1], reuse)
    mx.eval([c.state for c in cache])
    return cache


def compute_alone(engine, tokens: list[int], reuse: int, prefix_cache: list) -> float:
    """Plain mlx-lm's passes for the same request over a KVCache holding the prefix, as
    `generate_step` makes them (the remainder but its last token in prefill-step chunks, then
    the last token alone), to its greedy first token. generate_step itself queues its next
    step before it yields that token, and on the CPU `mx.async_eval` returns only once most
    of a queued step has run (a pass more: ~70 ms at 16K); kvtier reads the token first
    (Scheduler._first_token_alone), so the baseline stops at the token too, without that step."""
    import mlx.core as mx

    cache = prefix_held(engine, prefix_cache, reuse, capacity=len(tokens) + 1)
    remainder = tokens[reuse:]
    started = time.perf_counter()
    while len(remainder) > 1:
        n = min(engine.prefill_step_size, len(remainder) - 1)
        engine.model(mx.array(remainder[:n])[None], cache=cache)
        mx.eval([c.state for c in cache])
        remainder = remainder[n:]
    logits = engine.model(mx.array(remainder)[None], cache=cache)[:, -1, :]
    mx.argmax(logits - mx.logsumexp(logits, keepdims=True), axis=-1).item()
    return time.perf_counter() - started


def one_pass(engine, tokens: list[int], reuse: int, prefix_cache: list) -> float:
    """The remainder past `reuse` in one forward pass over a KVCache holding the prefix, then
    its greedy token: less compute than mlx-lm's schedule, but not its text (a pass of many
    tokens rounds differently from a pass of one)."""
    import mlx.core as mx

    cache = prefix_held(engine, prefix_cache, reuse, capacity=len(tokens) + 1)
    started = time.perf_counter()
    logits = engine.model(mx.array(tokens[reuse:])[None], cache=cache)[:, -1, :]
    mx.argmax(logits, axis=-1).item()
    return time.perf_counter() - started


def prefix_cache_of(engine, tokens: list[int]) -> tuple[int, list]:
    """The prompt cache the tiers restore for `tokens` (not timed), for the baselines: from
    the blocks, never a live cache, which stays for the next warm request to take over."""
    from kvtier.requests import GenerationRequest

    restored, prompt_cache, _ = engine._restore(GenerationRequest(tokens, max_tokens=1))
    engine.store.keep(restored, prompt_cache, sequence=None, snapshots={})  # as Engine.abandon
    return restored.reuse, prompt_cache


def baselines(engine, run: dict, repeats: int) -> tuple[float, float]:
    """Plain mlx-lm's compute of `run`'s remainder (the tokens it did not reuse), on its own
    schedule and in one pass: medians of `repeats`."""
    reuse = run["reused"]
    held, cache = prefix_cache_of(engine, run["tokens"])  # the run stored its prompt: all is held
    assert held >= reuse, (held, reuse)
    return (statistics.median(compute_alone(engine, run["tokens"], reuse, cache) for _ in range(repeats)),
            statistics.median(one_pass(engine, run["tokens"], reuse, cache) for _ in range(repeats)))


def restored_files(engine, tokens: list[int]) -> list[Path]:
    """The block files a restore of `tokens` reads from disk, in chain order: the store's own
    lookup, untimed; without `keep` nothing is promoted, so the timed request still reads them."""
    from kvtier.kvstate import PromptBuffers

    restored = engine.store.restore(tokens, into=PromptBuffers(engine.layout, capacity=len(tokens) + 1))
    return [engine.store.files.path_for(h.ref.hex) for h in restored.match.hits if h.source == "disk"]


def measure_in_process(model: Path, systems: dict[int, str], cache_dir: Path) -> dict:
    from kvtier.config import CacheConfig
    from kvtier.engine import Engine

    scenarios = ("warm", "after_restart", "after_restart_cached")
    out: dict = {"cold": {}, **{s: {} for s in scenarios}, "compute": {s: {} for s in scenarios},
                 "one_pass": {s: {} for s in scenarios}, "raw_read_restored": {}}

    def note(engine, scenario: str, n: int, run: dict, repeats: int) -> None:
        out[scenario][str(n)] = slim(run)
        out["compute"][scenario][str(n)], out["one_pass"][scenario][str(n)] = baselines(engine, run, repeats)

    def note_alternated(engine, n: int, system: str) -> None:
        """Warm requests, each followed by the baselines of its remainder: measured in turn,
        so that neither side has a quieter moment of the shared cores (bench/passes.py)."""
        runs, computes, passes = [], [], []
        for i in range(REPEATS):
            runs.append(engine_request(engine, messages_for(system, warm_question(i))))
            compute, single = baselines(engine, runs[-1], 1)
            computes.append(compute)
            passes.append(single)
        out["warm"][str(n)] = slim(median_run(runs))
        out["compute"]["warm"][str(n)] = statistics.median(computes)
        out["one_pass"]["warm"][str(n)] = statistics.median(passes)

    @contextlib.contextmanager
    def started_engine() -> Iterator[Engine]:
        """A fresh Engine on the cache (each one after the first: a restart), past MLX's
        first-call set-up; its blocks flushed to disk when done."""
        engine = Engine(str(model), CacheConfig(cache_dir=cache_dir, ram_budget=8 << 30))
        try:
            engine_request(engine, [{"role": "user", "content": "Say hi."}])
            yield engine
            engine.store.flush()
        finally:
            engine.close()

    with started_engine() as engine:
        for n, system in systems.items():
            log(f"  in-process {n}: cold, then {REPEATS} warm")
            out["cold"][str(n)] = slim(engine_request(engine, messages_for(system, QUESTIONS[0])))
            engine_request(engine, messages_for(system, PRIMING_QUESTION))
            note_alternated(engine, n, system)
    with started_engine() as engine:
        for n, system in systems.items():
            log(f"  in-process {n}: after restart, the cache's files evicted from the page cache")
            messages = messages_for(system, restart_question(0))
            engine.store.wait_for_writes()  # the last length's blocks: not part of the raw read
            files = restored_files(engine, engine.renderer.render(messages)[0])
            evict_files(cache_dir)
            out["raw_read_restored"][str(n)] = read_files(files)  # the disk's floor for this restore
            evict_files(cache_dir)
            note(engine, "after_restart", n, engine_request(engine, messages), 1)
    with started_engine() as engine:
        for n, system in systems.items():
            log(f"  in-process {n}: after restart, the cache's files in the page cache")
            into_page_cache(cache_dir)
            note(engine, "after_restart_cached", n, engine_request(engine, messages_for(system, restart_question(1))), 1)
    return out


def slim(run: dict) -> dict:
    return {k: v for k, v in run.items() if k != "tokens"}


def median_run(runs: list[dict]) -> dict:
    """The run of median TTFT, its steps as they were (a median per step would not add up)."""
    return sorted(runs, key=lambda r: r["ttft"])[len(runs) // 2]


# -- restore bandwidth, in-process -------------------------------------------------------------
def measure_bandwidth(model: Path, system: str, cache_dir: Path, drop_all: bool = False, trials: int = 3) -> dict:
    """The median (by ratio) of `trials` bandwidth_trial runs: this VM's disk varies by up
    to 2x between runs, so one trial decides nothing; every trial's ratio is kept."""
    runs = [bandwidth_trial(model, system, cache_dir, drop_all) for _ in range(trials)]
    return {**sorted(runs, key=lambda run: run["ratio"])[len(runs) // 2], "ratios": [run["ratio"] for run in runs]}


def bandwidth_trial(model: Path, system: str, cache_dir: Path, drop_all: bool = False) -> dict:
    """After a restart, the cache's files evicted from the page cache (or, `drop_all`, every
    cache dropped: code and libraries too): the restore's KV bytes over its seconds, against a
    raw sequential read of the same block files, evicted again. Uses a copy of `cache_dir`."""
    from kvtier.config import CacheConfig
    from kvtier.engine import Engine

    cache = cache_dir.with_name(cache_dir.name + ("-drop" if drop_all else "-evict"))
    shutil.copytree(cache_dir, cache)
    engine = Engine(str(model), CacheConfig(cache_dir=cache, ram_budget=8 << 30))
    try:
        engine_request(engine, [{"role": "user", "content": "Say hi."}])
        evicted = drop_page_cache() if drop_all else evict_files(cache)
        run = engine_request(engine, messages_for(system, QUESTIONS[3]))
    finally:
        engine.close()
    raw_evicted = drop_page_cache() if drop_all else evict_files(cache)
    raw = raw_read(cache / "blocks")
    shutil.rmtree(cache, ignore_errors=True)
    bandwidth = run["restored_bytes"] / run["restore_seconds"] / 1e9
    return {"restored_bytes": run["restored_bytes"], "restore_seconds": run["restore_seconds"],
            "disk_tokens": run["disk_tokens"], "steps": run["steps"], "ttft": run["ttft"],
            "restore_gb_per_s": bandwidth, "raw_read": raw, "ratio": bandwidth / raw["gb_per_s"],
            "eviction": "every cache (drop_caches)" if drop_all else "the cache's files (fadvise)",
            "evicted": [evicted, raw_evicted]}


# -- through the servers ---------------------------------------------------------------------------
def ask(server: Server, model: str, system: str, question: int | str) -> dict:
    text = QUESTIONS[question] if isinstance(question, int) else question
    timed = stream_chat(server, model, messages_for(system, text))
    k = timed.usage.get("kvtier") or {}
    return {"ttft": timed.ttft, "prompt_tokens": timed.usage.get("prompt_tokens"),
            "engine_ttft": k.get("time_to_first_token"), "restore_seconds": k.get("restore_seconds"),
            "restored_bytes": k.get("restored_bytes"), "disk_tokens": k.get("disk_tokens"), "text": timed.text}


def measure_kvtier_daemon(model: Path, systems: dict[int, str], cache_dir: Path, work: Path) -> dict:
    """kvtier serve on a copy of the in-process cache, with no start-up prefetch (the disk
    path): after restart (the cache's files evicted from the page cache), then warm; then
    restarted again with the files in the page cache. Then, files evicted, with the default
    prefetch: after restart once it has read the cache into RAM. Client TTFT beside the
    engine's own; new questions, not the in-process ones."""
    out: dict = {"after_restart": {}, "warm": {}, "after_restart_cached": {}, "after_restart_prefetched": {}}
    server = Server.kvtier(model, cache_dir, work / "kvtier.log", *DISK_PATH)
    with server:
        warm_up(server, str(model))
        for n, system in systems.items():
            log(f"  kvtier serve {n}: after restart (files evicted), then warm")
            evict_files(cache_dir)
            out["after_restart"][str(n)] = ask(server, str(model), system, restart_question(2))
            runs = [ask(server, str(model), system, warm_question(REPEATS + i)) for i in range(REPEATS)]
            out["warm"][str(n)] = sorted(runs, key=lambda r: r["ttft"])[len(runs) // 2]
    with server:  # a restart: the files stay in the page cache
        warm_up(server, str(model))
        for n, system in systems.items():
            log(f"  kvtier serve {n}: after restart (files in the page cache)")
            into_page_cache(cache_dir)
            out["after_restart_cached"][str(n)] = ask(server, str(model), system, restart_question(3))
    trials = [prefetch_trial(model, systems, cache_dir, work, trial) for trial in range(PREFETCH_TRIALS)]
    out["prefetch"] = trials[-1]["prefetch"]
    for length in map(str, systems):
        runs = [t["first"][length] for t in trials]
        ratios = [t["first"][length]["ttft"] / t["warm"][length] for t in trials]
        out["after_restart_prefetched"][length] = {**median_run(runs), "trials": [r["ttft"] for r in runs],
                                                   "warm_trials": [t["warm"][length] for t in trials],
                                                   "ratios": ratios, "ratio": statistics.median(ratios)}
    return out


def prefetch_trial(model: Path, systems: dict[int, str], cache_dir: Path, work: Path, trial: int) -> dict:
    """A restart with the default prefetch, files evicted: at each length the first request
    (once the prefetch has read the cache into RAM), then REPEATS warm ones in the same
    process. Their ratio compares like with like: this VM's speed drifts between processes
    by more than the 1.2x target's margin (16K: 225-297 ms for one request in three runs)."""
    evict_files(cache_dir)
    out: dict = {"first": {}, "warm": {}}
    with Server.kvtier(model, cache_dir, work / f"kvtier-prefetch-{trial}.log") as server:
        log(f"  kvtier serve: after restart, once the start-up prefetch ended ({trial + 1}/{PREFETCH_TRIALS})")
        out["prefetch"] = wait_for_prefetch(server)
        warm_up(server, str(model))
        for n, system in systems.items():
            out["first"][str(n)] = ask(server, str(model), system, restart_question(4 + trial))
            asked = 4 + PREFETCH_TRIALS + trial * REPEATS  # new questions, of the same length as the first
            warm = [ask(server, str(model), system, restart_question(asked + i))["ttft"] for i in range(REPEATS)]
            out["warm"][str(n)] = statistics.median(warm)
    return out


def measure_mlx_server(model: Path, systems: dict[int, str], work: Path) -> dict:
    out: dict = {"cold": {}, "warm": {}}
    with Server.mlx_lm(model, work / "mlx.log") as server:
        warm_up(server, str(model))
        for n, system in systems.items():
            log(f"  mlx_lm.server {n}: cold, then {REPEATS} warm")
            out["cold"][str(n)] = ask(server, str(model), system, 0)
            ask(server, str(model), system, PRIMING_QUESTION)
            runs = [ask(server, str(model), system, warm_question(i)) for i in range(REPEATS)]
            out["warm"][str(n)] = sorted(runs, key=lambda r: r["ttft"])[len(runs) // 2]
    return out


def run(lengths: list[int] | None = None, work: Path | None = None, mlx_server: bool = True) -> dict:
    """All the measurements: a result dict (see `table` and `targets`)."""
    from transformers import AutoTokenizer

    from tests.support.testmodels import make_model

    lengths = lengths or LENGTHS
    model = make_model(ROOT / ".models" / "llama", "llama")
    systems = length_systems(lengths, AutoTokenizer.from_pretrained(str(model)))
    work = work or Path(tempfile.mkdtemp(prefix="kvtier-steps-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        log("steps: in-process, warm and after a restart")
        results = {"lengths": lengths, "machine": machine_description(),
                   "in_process": measure_in_process(model, systems, work / "cache")}
        log("steps: restore bandwidth vs raw read")
        results["bandwidth"] = measure_bandwidth(model, systems[max(lengths)], work / "cache")
        results["bandwidth_drop_all"] = measure_bandwidth(model, systems[max(lengths)], work / "cache", drop_all=True)
        log("steps: kvtier serve")
        shutil.copytree(work / "cache", work / "cache-daemon")
        results["kvtier_serve"] = measure_kvtier_daemon(model, systems, work / "cache-daemon", work)
        if mlx_server:
            log("steps: mlx_lm.server")
            results["mlx_lm.server"] = measure_mlx_server(model, systems, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["targets"] = targets(results)
    return results


# -- targets and report ----------------------------------------------------------------------------
SCENARIOS = [("warm", "warm"), ("after_restart", "after restart, files evicted"),
             ("after_restart_cached", "after restart, files in the page cache"),
             ("after_restart_prefetched", "after restart, once the start-up prefetch read the files (median of 3 restarts)")]


def in_process(results: dict) -> dict:
    """The in-process results; a result saved before the "one pass" column had one baseline
    per scenario (`compute_warm`, `compute_restart`), shown as its compute alone."""
    ip = results["in_process"]
    if "compute" in ip:
        return ip
    return dict(ip, compute={"warm": ip.get("compute_warm", {}), "after_restart": ip.get("compute_restart", {})},
                one_pass={}, raw_read_restored={})


def baseline(results: dict, kind: str, scenario: str, n: int) -> float | None:
    return in_process(results)[kind].get(scenario, {}).get(str(n))


def overhead(results: dict, n: int, scenario: str = "warm") -> float | None:
    """TTFT less plain mlx-lm's passes for the same remainder over the prefix (compute_alone)."""
    compute = baseline(results, "compute", scenario, n)
    return None if compute is None else in_process(results)[scenario][str(n)]["ttft"] - compute


def disk_floor(results: dict, n: int) -> float | None:
    """Warm TTFT plus a raw read of the files the after-restart request restored: what a
    restart can cost at least on this disk, the copy from RAM aside."""
    raw = in_process(results)["raw_read_restored"].get(str(n))
    return None if raw is None else in_process(results)["warm"][str(n)]["ttft"] + raw["seconds"]


def targets(results: dict) -> list[dict]:
    lengths = results["lengths"]
    checks = []
    ml = results.get("mlx_lm.server")
    if ml:
        for n in lengths:
            kv, ref = results["kvtier_serve"]["warm"][str(n)]["ttft"], ml["warm"][str(n)]["ttft"]
            checks.append((f"warm TTFT at {n} tokens <= mlx_lm.server's", kv, f"<= {ref:.3f} s", kv <= ref, "s"))
    big = max(lengths)
    extra = overhead(results, big)
    if extra is not None:
        checks.append((f"warm overhead beyond plain mlx-lm's compute of the same request at {big} tokens <= 10 ms",
                       extra, "<= 10 ms", extra <= 0.010, "ms"))
    ratio = results["bandwidth"]["ratio"]
    checks.append(("restore bandwidth >= 90% of a raw read (in-process, cache files evicted, median of 3 trials)", ratio,
                   ">= 90%", ratio >= 0.9, "%"))
    serve = results["kvtier_serve"]  # client-side: what a user of the daemon waits
    for n in [n for n in lengths if n >= 4096]:
        r = serve["after_restart"][str(n)]["ttft"] / serve["warm"][str(n)]["ttft"]
        checks.append((f"after-restart TTFT at {n} tokens <= 1.2x warm (kvtier serve, no prefetch: the "
                       "blocks read from disk by the request, files evicted)", r, "<= 1.2x", r <= 1.2, "x"))
    for n in [n for n in lengths if n >= 4096 and str(n) in serve.get("after_restart_prefetched", {})]:
        r = serve["after_restart_prefetched"][str(n)]["ratio"]
        checks.append((f"after-restart TTFT at {n} tokens <= 1.2x warm (kvtier serve, the default: once the "
                       f"start-up prefetch has read the cache into RAM; median of {PREFETCH_TRIALS} restarts, each "
                       "against the warm TTFT of its own process)", r, "<= 1.2x", r <= 1.2, "x"))
    for n in [n for n in lengths if n >= 4096]:
        floor = disk_floor(results, n)
        if floor is not None:
            r = in_process(results)["after_restart"][str(n)]["ttft"] / floor
            checks.append((f"after-restart TTFT at {n} tokens (files evicted) <= 1.1x (warm TTFT + raw read of "
                           "the restored files), in-process: the disk's floor", r, "<= 1.1x", r <= 1.1, "x"))
    shown = {"s": lambda v: f"{v:.3f} s", "ms": lambda v: f"{1000 * v:.1f} ms", "%": lambda v: f"{100 * v:.1f}%",
             "x": lambda v: f"{v:.2f}x"}
    return [{"name": name, "value": round(v, 4), "shown": shown[unit](v), "target": t, "pass": bool(ok)}
            for name, v, t, ok, unit in checks]


def ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{1000 * seconds:.1f}"


def table(results: dict) -> list[str]:
    ip, lengths = in_process(results), results["lengths"]
    header = ["request", "tokens (reused)"] + STEPS + ["TTFT", "compute alone", "one pass", "overhead",
                                                       "kvtier serve TTFT", "mlx_lm.server TTFT"]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|" + "---:|" * (len(header) - 2)]
    ml = results.get("mlx_lm.server") or {}
    for scenario, label in SCENARIOS:
        for n in lengths:
            r = ip.get(scenario, {}).get(str(n))
            if r is None:  # a result saved before this scenario
                continue
            serve = results["kvtier_serve"].get(scenario, {}).get(str(n), {})
            steps = [ms(r["steps"].get(s, 0.0)) for s in STEPS]
            mlx = ml.get("warm", {}).get(str(n), {}).get("ttft") if scenario == "warm" else None
            lines.append("| " + " | ".join([f"{label} {n:,}", f"{r['prompt_tokens']:,} ({r['reused']:,})",
                                            *steps, ms(r["ttft"]), ms(baseline(results, "compute", scenario, n)),
                                            ms(baseline(results, "one_pass", scenario, n)),
                                            ms(overhead(results, n, scenario)), ms(serve.get("ttft")),
                                            ms(mlx)]) + " |")
    return lines


def floor_lines(results: dict) -> list[str]:
    """After a restart against the disk's floor: warm TTFT + a raw read of the restored files."""
    ip = in_process(results)
    if not ip["raw_read_restored"]:
        return []
    lines = ["| prompt | warm TTFT | raw read of the restored files (evicted) | warm + raw read | "
             "after restart, files evicted | after restart, page cache | evicted / (warm + raw read) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for n in results["lengths"]:
        raw, floor = ip["raw_read_restored"][str(n)], disk_floor(results, n)
        evicted = ip["after_restart"][str(n)]["ttft"]
        cached = ip.get("after_restart_cached", {}).get(str(n), {}).get("ttft")
        lines.append(f"| {n:,} | {ms(ip['warm'][str(n)]['ttft'])} ms | {ms(raw['seconds'])} ms ({raw['files']} files, "
                     f"{raw['bytes'] / 1e6:.1f} MB) | {ms(floor)} ms | {ms(evicted)} ms | {ms(cached)} ms | "
                     f"{evicted / floor:.2f}x |")
    return lines


def serve_lines(results: dict) -> list[str]:
    """What HTTP, rendering, the queue and the first SSE write add: client TTFT - engine's."""
    lines = ["| request | kvtier serve client TTFT | engine's own TTFT | HTTP + render + queue + SSE |",
             "|---|---:|---:|---:|"]
    for scenario, label in SCENARIOS:
        for n in results["lengths"]:
            r = results["kvtier_serve"].get(scenario, {}).get(str(n), {})
            if r.get("engine_ttft") is None:
                continue
            lines.append(f"| {label} {n:,} | {ms(r['ttft'])} ms | "
                         f"{ms(r['engine_ttft'])} ms | {ms(r['ttft'] - r['engine_ttft'])} ms |")
    return lines


def prefetch_lines(results: dict) -> list[str]:
    """The start-up prefetch of the last serve phase: what it read, how fast."""
    p = results["kvtier_serve"].get("prefetch")
    if not p or not p.get("seconds"):
        return []
    return [f"Start-up prefetch (the last phase, files evicted first): {p['entries']} entries, "
            f"{p['bytes'] / 1e6:.1f} MB in {p['seconds']:.3f} s ({p['bytes'] / p['seconds'] / 1e9:.2f} GB/s), "
            "in the background after the model loaded.", ""]


def prefetch_trial_lines(results: dict) -> list[str]:
    """Each restart with the prefetch: its first request against the warm ones after it."""
    rows = results["kvtier_serve"].get("after_restart_prefetched", {})
    if not any("ratios" in r for r in rows.values()):  # a result saved before the paired trials
        return []
    lines = ["| prompt | first request after each restart | warm, same process (median of "
             f"{REPEATS}) | first / warm | median |", "|---|---:|---:|---:|---:|"]
    for n, r in rows.items():
        listed = [", ".join(f"{ms(v)}" for v in r[k]) for k in ("trials", "warm_trials")]
        ratios = ", ".join(f"{v:.2f}x" for v in r["ratios"])
        lines.append(f"| {int(n):,} | {listed[0]} ms | {listed[1]} ms | {ratios} | {r['ratio']:.2f}x |")
    return lines + [""]


def trial_ratios(bandwidth: dict) -> str:
    ratios = bandwidth.get("ratios", [])
    return f" (median of {', '.join(f'{100 * r:.0f}%' for r in ratios)})" if len(ratios) > 1 else ""


def bandwidth_lines(results: dict) -> list[str]:
    lines = ["| cold page cache for | restored | restore time | restore | raw read of the files | restore / raw |",
             "|---|---:|---:|---:|---:|---:|"]
    for key in ("bandwidth", "bandwidth_drop_all"):
        b = results.get(key)
        if not b:
            continue
        raw = b["raw_read"]
        ok = all(e["ok"] for e in b["evicted"])
        lines.append(f"| {b['eviction']}{'' if ok else ' (FAILED: reads may be cached)'} | "
                     f"{b['restored_bytes'] / 1e6:.1f} MB ({b['disk_tokens']:,} tokens) | {b['restore_seconds']:.3f} s | "
                     f"{b['restore_gb_per_s']:.2f} GB/s | {raw['gb_per_s']:.2f} GB/s ({raw['files']} files, "
                     f"{raw['bytes'] / 1e6:.1f} MB) | {100 * b['ratio']:.0f}%{trial_ratios(b)} |")
    serve = results["kvtier_serve"]["after_restart"][str(max(results["lengths"]))]
    if serve.get("restore_seconds") and serve.get("restored_bytes"):
        lines.append(f"| kvtier serve, after restart: the cache's files (fadvise) | {serve['restored_bytes'] / 1e6:.1f} MB "
                     f"({serve.get('disk_tokens') or 0:,} tokens) | {serve['restore_seconds']:.3f} s | "
                     f"{serve['restored_bytes'] / serve['restore_seconds'] / 1e9:.2f} GB/s | | |")
    return lines


def render(results: dict, command: str) -> str:
    floor = floor_lines(results)
    return "\n".join([
        "## Per-request steps: warm and after a restart", "",
        f"Measured {results.get('date', time.strftime('%Y-%m-%d'))} on {results['machine']} (a shared VM: "
        f"compare the columns of one row). Command: `{command}`. Model: generated llama, hidden 512, "
        "8 layers, float32. Step times in ms, in-process, from `Usage.steps` (kvtier/engine.py); warm is "
        f"the median of {REPEATS} requests, each a new question; after restart a fresh Engine on the same "
        "cache, its files evicted from the page cache (`posix_fadvise(DONTNEED)`, as after a reboot) or "
        "still in it (read once before: a daemon restart), each with a question of its own. Compute alone: "
        "plain mlx-lm's forward passes for the same request over a KVCache holding the prefix, on "
        "`generate_step`'s schedule (the remainder but its last token, then the last token alone), to its "
        "first token (without the next step generate_step queues before yielding it); overhead = TTFT - "
        "compute alone. One pass: the remainder in a single forward "
        "pass, less compute but not mlx-lm's text. kvtier serve and mlx_lm.server: client-side "
        "TTFT of a streamed request (warm: a new question on the cached system prompt).", "",
        *table(results), "", *serve_lines(results), "", *prefetch_lines(results), *prefetch_trial_lines(results),
        *(["### After a restart: the disk's floor (in-process)", "", *floor, ""] if floor else []),
        "### Restore bandwidth (in-process)", "",
        *bandwidth_lines(results), "", *target_table(results["targets"]),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--no-mlx-server", action="store_true", help="skip mlx_lm.server (its cold prefills)")
    parser.add_argument("--write", action="store_true", help="write the section of docs/benchmarks.md")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="only report a saved result (docs/bench/steps.json), its targets checked again")
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads(args.render.read_text())
        results["targets"] = targets(results)
    else:
        results = run([int(n) for n in args.lengths.split(",")], mlx_server=not args.no_mlx_server)
        results["command"] = command_line("steps.py", argv)
        results["date"] = time.strftime("%Y-%m-%d")
    text = render(results, results.get("command", "python bench/steps.py --write"))
    print(text)
    if args.write:
        write_result("steps", results, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
