"""Two models in one agent session: kvtier vs mlx_lm.server, side by side in one run (issue 31).

An agent works with two generated models of different architectures (llama and qwen3_next,
of about the same weight size), a few turns on one, then a few on the other, and so on; each
model has its own conversation on a ~2K-token system prompt that grows turn by turn. Servers:
  - kvtier: one daemon serving both (`--model NAME=PATH` twice) under a `--memory-budget`
    that fits one model's weights plus its hot KV, so every switch unloads the other model
    (its hot KV queued for the SSD, written while the next loads) and loads the requested one
  - mlx_lm.server as a user runs it: it loads the model a request names (a path), one at a
    time; its prompt cache (an LRU of 10 entries, keyed by model) stays in RAM across switches
  - mlx_lm.server --prompt-cache-bytes X, X = kvtier's `--ram-budget`: the same memory for KV
    between requests as kvtier's RAM tier
All run at once and take turns (a rotating order), so other load on the machine falls on them
alike. Measured per turn: TTFT (streamed, to the first text), the prompt tokens each server
reports as cached, the answer; each model's load time by plain `mlx_lm.load` in this process.
Targets (PASS/FAIL lines, also in OUT/benchmarks.md's `models` section with OUT/bench/models.json
and OUT/bench/models.png; OUT = docs/, --quick: a temp dir unless --out is given): kvtier's first
turn back on a model <= its load time + 1.5x a warm turn's TTFT; kvtier's total session TTFT
<= 0.3x mlx_lm.server's; kvtier's greedy answers equal mlx_lm.server's turn by turn. Run with
OpenBLAS preloaded, as `make bench` does, and `nice -n 10` on a shared machine.

    python bench/models.py [--quick] [--out DIR] [--render]
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    ROOT,
    Server,
    bench_options,
    command_line,
    free_port,
    log,
    machine_description,
    record,
    stream_chat,
    write_results,
    wrote_line,
)
from models_report import KVTIER, mismatches, peers, plot, render, target_lines, targets
from prompts import QUESTIONS, agent_system_prompt
from tests.support.testmodels import make_model

# Two architectures of about the same weight size (107 and 120 MB), so that a budget that fits
# one model and its hot KV fits never both, whatever the KV holds at a switch.
MODELS: list[dict] = [{"name": "llama", "arch": "llama", "hidden": 512, "layers": 8},
                      {"name": "qwen3_next", "arch": "qwen3_next", "hidden": 512, "layers": 8}]
SETTLE = 0.3  # seconds between two servers' turns: the last one's background work (disk writes) ends
USER_TOKENS = 40  # about what a turn's user message and the template around the answer add
LOADS = 3  # plain mlx_lm.loads timed per model (after a first one that reads the files into the page cache)


@dataclass(frozen=True)
class Sizes:
    system_tokens: int = 2048
    turns_per_block: int = 3
    blocks: int = 8  # model A, B, A, B, ...: the first block on each is cold, the others come back
    max_tokens: int = 32


FULL = Sizes()
QUICK = Sizes(system_tokens=512, turns_per_block=2, blocks=4, max_tokens=16)


# -- the models ------------------------------------------------------------------------------
def model_path(spec: dict) -> Path:
    return make_model(ROOT / ".models" / f"{spec['arch']}-h{spec['hidden']}-l{spec['layers']}", spec["arch"],
                      hidden=spec["hidden"], layers=spec["layers"])


def kv_bytes_per_token(model: Any, tokens: int = 256) -> float:
    """A cache's bytes over a prefill of `tokens` (recurrent state included), per token."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([list(range(1, tokens + 1))]), cache=cache))
    return sum(c.nbytes for c in cache) / tokens


def measure_model(spec: dict) -> tuple[dict, Any]:
    """Weights on disk, plain mlx_lm.load's time (median of LOADS) and the KV bytes a token."""
    import mlx.core as mx
    import mlx_lm

    path = model_path(spec)
    mlx_lm.load(str(path))  # reads the files into the page cache, as for every server
    seconds = []
    for _ in range(LOADS):
        started = time.perf_counter()
        model, tokenizer = mlx_lm.load(str(path))
        seconds.append(time.perf_counter() - started)
    info = {**spec, "path": str(path), "weight_bytes": sum(f.stat().st_size for f in path.glob("*.safetensors")),
            "load_seconds": seconds, "kv_bytes_per_token": kv_bytes_per_token(model)}
    del model
    mx.clear_cache()
    return info, tokenizer


def budgets(models: dict, sizes: Sizes, system_tokens: int) -> tuple[int, int]:
    """(kvtier's --ram-budget, its --memory-budget). The RAM budget holds the longest
    conversation's KV at the session's end with a quarter to spare; the memory budget is the
    larger model's weights plus that twice (the RAM tier and the live cache), less than both
    models' weights: a model loads only once the other is unloaded."""
    turns = sizes.turns_per_block * ((sizes.blocks + 1) // 2)
    tokens = system_tokens + turns * (sizes.max_tokens + USER_TOKENS)
    ram = int(1.25 * tokens * max(m["kv_bytes_per_token"] for m in models.values()))
    memory = max(m["weight_bytes"] for m in models.values()) + 2 * ram
    if memory >= sum(m["weight_bytes"] for m in models.values()):
        raise SystemExit(f"a memory budget of {memory} bytes would hold both models: choose larger models")
    return ram, memory


# -- the servers -----------------------------------------------------------------------------
@dataclass
class Target:
    """A server under test: its processes, and which process and `model` field serve a model."""
    name: str
    flags: str
    servers: list[Server]
    route: dict[str, tuple[Server, str]] = field(default_factory=dict)


def serves_many_models() -> bool:
    """Whether this checkout's kvtier serves several models (issue 31's --memory-budget)."""
    out = subprocess.run([sys.executable, "-m", "daemon.cli", "serve", "--help"], cwd=ROOT,
                         capture_output=True, text=True).stdout
    return "--memory-budget" in out


def kvtier(models: dict, ram: int, memory: int, work: Path) -> Target:
    """One daemon for both models; before issue 31, a daemon per model (no budget: none unloads)."""
    if not serves_many_models():
        log("this kvtier serves one model a daemon: running one per model, without a memory budget")
        servers = {name: Server.kvtier(Path(m["path"]), work / f"cache-{name}", work / f"kvtier-{name}.log",
                                       "--ram-budget", str(ram)) for name, m in models.items()}
        return Target(KVTIER, f"a daemon per model, --ram-budget {ram}", list(servers.values()),
                      {name: (s, models[name]["path"]) for name, s in servers.items()})
    flags = [arg for name, m in models.items() for arg in ("--model", f"{name}={m['path']}")]
    flags += ["--memory-budget", str(memory), "--ram-budget", str(ram)]
    port = free_port()
    server = Server(KVTIER, [sys.executable, "-m", "daemon.cli", "serve", *flags, "--port", str(port),
                             "--cache-dir", str(work / "cache")], port, work / "kvtier.log")
    shown = " ".join(flags).replace(str(ROOT) + "/", "")
    return Target(KVTIER, f"kvtier serve {shown}", [server], {name: (server, name) for name in models})


def mlx_lm_server(models: dict, work: Path, name: str, *flags: str) -> Target:
    """mlx_lm.server started on the first model; a request naming the other's path loads that."""
    first = next(iter(models.values()))
    server = Server.mlx_lm(Path(first["path"]), work / f"{name.replace(' ', '_')}.log")
    server.args += list(flags)
    shown = " ".join(["mlx_lm.server --model", first["path"], *flags]).replace(str(ROOT) + "/", "")
    return Target(name, shown, [server], {n: (server, m["path"]) for n, m in models.items()})


def start(targets: list[Target], first_model: str) -> None:
    """Every server up, each with one short request on the first model (MLX's first-call set-up)."""
    for target in targets:
        for server in target.servers:
            server.start()
        for model, (server, model_field) in target.route.items():
            if model == first_model or len(target.servers) > 1:
                stream_chat(server, model_field, [{"role": "user", "content": "Say hi."}], max_tokens=2)


def stop(targets: list[Target]) -> None:
    for target in targets:
        for server in target.servers:
            server.stop()


def peak_rss(target: Target) -> int | None:
    """The processes' peak resident memory (Linux's VmHWM), summed; None where unknown."""
    total = 0
    for server in target.servers:
        try:
            status = Path(f"/proc/{server.proc.pid}/status").read_text() if server.proc else ""
        except OSError:
            return None
        lines = [line for line in status.splitlines() if line.startswith("VmHWM:")]
        if not lines:
            return None
        total += int(lines[0].split()[1]) * 1024
    return total


LOADED = re.compile(r"model (\S+) loaded in ([0-9.]+) s")  # the worker's line at the end of each load
HEALTH_FIELDS = ("state", "loads", "load_seconds", "weight_bytes", "hot_bytes")


def kvtier_loads(target: Target) -> dict[str, list[float]]:
    """Every load of each model, in order, as kvtier's log tells it (seconds, to 0.1 s)."""
    out: dict[str, list[float]] = {}
    for server in target.servers:
        for name, seconds in LOADED.findall(server.log.read_text(errors="replace")):
            out.setdefault(name, []).append(float(seconds))
    return out


def kvtier_unloads(target: Target) -> list[float]:
    """Seconds of each unload to make room for another model, from kvtier's log: from its
    "unloading model" line to the next "loading model" (its hot KV is written to SSD between)."""
    out: list[float] = []
    for server in target.servers:
        unloading: datetime.datetime | None = None
        for line in server.log.read_text(errors="replace").splitlines():
            if "kvtier.worker: unloading model" in line and "to make room" in line:
                unloading = _logged_at(line)
            elif "kvtier.worker: loading model" in line and unloading is not None:
                out.append(round((_logged_at(line) - unloading).total_seconds(), 3))
                unloading = None
    return out


def _logged_at(line: str) -> datetime.datetime:
    return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")


def kvtier_health(target: Target) -> dict[str, dict]:
    """What kvtier's /health says of each model (issue 31's `models`), where it says it."""
    out: dict[str, dict] = {}
    for name, (server, _) in target.route.items():
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=30) as response:
                health = json.load(response)
        except OSError:  # a 503 while the default model is unloaded, before /health knows many models
            continue
        listed = health.get("models") or {}
        if isinstance(listed, list):  # a list of models, or a mapping of name to model
            listed = {m.get("name"): m for m in listed}
        fields = {key: value for key, value in (listed.get(name) or {}).items() if key in HEALTH_FIELDS}
        if fields:
            out[name] = fields
    return out


# -- the session -----------------------------------------------------------------------------
def schedule(models: list[str], sizes: Sizes) -> list[str]:
    """The model of each turn: `turns_per_block` on one, then on the next, round and round."""
    return [models[b % len(models)] for b in range(sizes.blocks) for _ in range(sizes.turns_per_block)]


class Session:
    """One server's conversations, a model each, growing turn by turn with its own answers."""

    def __init__(self, target: Target, systems: dict[str, str]):
        self.target = target
        self.conversations = {name: [{"role": "system", "content": text}] for name, text in systems.items()}
        self.turns: list[dict] = []
        self.sent: list[list[dict]] = []  # the messages of each turn, for the plain mlx-lm check

    def turn(self, model: str, max_tokens: int) -> dict:
        messages = self.conversations[model]
        asked = sum(m["role"] == "user" for m in messages)
        messages.append({"role": "user", "content": f"{QUESTIONS[asked % len(QUESTIONS)]} (step {asked + 1})"})
        server, model_field = self.target.route[model]
        timed = stream_chat(server, model_field, messages, max_tokens)
        self.sent.append([dict(m) for m in messages])
        messages.append({"role": "assistant", "content": timed.text})
        self.turns.append({"model": model, **record(timed)})
        return self.turns[-1]


def run_session(sessions: list[Session], order: list[str], max_tokens: int) -> None:
    for i, model in enumerate(order):
        shift = i % len(sessions)  # none always follows another
        for session in sessions[shift:] + sessions[:shift]:
            time.sleep(SETTLE)
            turn = session.turn(model, max_tokens)
            log(f"turn {i + 1} {model} {session.target.name}: {turn['ttft']:.2f} s, "
                f"{turn['cached_tokens']} of {turn['prompt_tokens']} tokens cached")


def reference(results: dict, sessions: list[Session], max_tokens: int) -> dict:
    """Plain mlx_lm.generate on the messages of each peer's first differing turn (the same
    messages for every server up to there): which server's answer it equals."""
    import mlx_lm

    out: dict[str, dict] = {}
    for peer in peers(results):
        differ = mismatches(results, peer)
        if not differ or str(differ[0]) in out:
            continue
        turn = differ[0]
        model, tokenizer = mlx_lm.load(results["models"][results["schedule"][turn]]["path"])
        prompt = tokenizer.apply_chat_template(sessions[0].sent[turn], add_generation_prompt=True)
        text = mlx_lm.generate(model, tokenizer, prompt=prompt, max_tokens=max_tokens)
        out[str(turn)] = {"text": text, "equal": [s.target.name for s in sessions if s.turns[turn]["text"] == text]}
        log(f"turn {turn + 1}: plain mlx-lm equals {out[str(turn)]['equal'] or 'neither'}")
    return out


# -- the run -----------------------------------------------------------------------------------
def load_average() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def prepare(sizes: Sizes) -> tuple[dict, dict[str, str], int, int]:
    """The models measured, each one's system prompt, and the budgets."""
    models, systems = {}, {}
    for i, spec in enumerate(MODELS):
        models[spec["name"]], tokenizer = measure_model(spec)
        systems[spec["name"]] = agent_system_prompt(sizes.system_tokens, tokenizer, project=spec["name"], seed=i,
                                                    step=1)
        log(f"{spec['name']}: {models[spec['name']]['weight_bytes'] / 2**20:.0f} MiB, load "
            f"{statistics.median(models[spec['name']]['load_seconds']):.2f} s")
    ram, memory = budgets(models, sizes, max(len(tokenizer.encode(s)) for s in systems.values()))
    return models, systems, ram, memory


def measure(sizes: Sizes, command: str) -> dict:
    started = time.perf_counter()
    models, systems, ram, memory = prepare(sizes)
    order = schedule(list(models), sizes)
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_description(), "command": command,
                     "load": {"start": load_average()}, **asdict(sizes), "models": models, "schedule": order,
                     "ram_budget": ram, "memory_budget": memory, "servers": {}}
    work = Path(tempfile.mkdtemp(prefix="kvtier-models-"))
    running = [kvtier(models, ram, memory, work), mlx_lm_server(models, work, "mlx_lm.server"),
               mlx_lm_server(models, work, "mlx_lm.server --prompt-cache-bytes", "--prompt-cache-bytes", str(ram))]
    try:
        start(running, order[0])
        sessions = [Session(target, systems) for target in running]
        run_session(sessions, order, sizes.max_tokens)
        for session in sessions:
            results["servers"][session.target.name] = {"flags": session.target.flags, "turns": session.turns,
                                                       "peak_rss": peak_rss(session.target)}
        results["servers"][KVTIER]["models"] = kvtier_health(running[0])
    except BaseException:
        log(f"failed; server logs kept in {work}")
        raise
    finally:
        stop(running)
    results["servers"][KVTIER]["loads"] = kvtier_loads(running[0])
    results["servers"][KVTIER]["unloads"] = kvtier_unloads(running[0])
    shutil.rmtree(work, ignore_errors=True)
    results["reference"] = reference(results, sessions, sizes.max_tokens)
    results["load"]["end"] = load_average()
    results["seconds"] = time.perf_counter() - started
    results["targets"] = targets(results)
    return results


def write(results: dict, out: Path) -> None:
    write_results("models", results, render, plot, out)


def main(argv: list[str] | None = None) -> int:
    args, out = bench_options("models", __doc__.splitlines()[0],
                              "a smoke run of a few minutes (a 512-token system prompt, 4 blocks of 2 turns)", argv)
    if args.render:
        results = json.loads((out / "bench" / "models.json").read_text())
        results["targets"] = targets(results)  # the report's current rules on the saved numbers
        write(results, out)
        print("\n".join(target_lines(results["targets"])))
        return 0
    results = measure(QUICK if args.quick else FULL, command_line("models.py", argv))
    write(results, out)
    print("\n".join(target_lines(results["targets"])))
    log(wrote_line("models", results, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
