"""Part 1: time to first token at several prefix lengths, kvtier vs mlx_lm.server: cold, warm
(a new question on the same system prompt), after a restart, and after memory pressure
(kvtier only: its hot tier spilled to disk)."""

from __future__ import annotations

import time
from pathlib import Path

from harness import Server, log, record, stream_chat, warm_up
from prompts import QUESTIONS, agent_system_prompt, messages_for

NO_PRESSURE = "n/a (no pressure response; keeps its RAM cache or evicts it)"
PRESSURE_ARGS = ["--pressure-below", "1000TB", "--pressure-keep", "0"]  # spill everything, now


def length_systems(lengths: list[int], tokenizer) -> dict[int, str]:
    # A project name and seed per length: the shorter prompts are not prefixes of the longer
    # ones (same-seed tool lists would be), so each length's cold request is really cold.
    return {n: agent_system_prompt(n, tokenizer, project=f"project{n}", seed=n, step=1) for n in lengths}


def ask(server: Server, model: str, system: str, question: int) -> dict:
    return record(stream_chat(server, model, messages_for(system, QUESTIONS[question])))


def ttft_by_length(server: Server, model: str, systems: dict[int, str]) -> dict:
    """cold and warm per length, then one restart and the after-restart request per length."""
    out: dict[str, dict] = {"cold": {}, "warm": {}, "after_restart": {}}
    with server:
        warm_up(server, model)
        for n, system in systems.items():
            log(f"  {server.name} {n}: cold, warm")
            out["cold"][str(n)] = ask(server, model, system, 0)
            out["warm"][str(n)] = ask(server, model, system, 1)
        server.restart()
        warm_up(server, model)
        for n, system in systems.items():
            log(f"  {server.name} {n}: after restart")
            out["after_restart"][str(n)] = ask(server, model, system, 2)
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
    with server:
        warm_up(server, model)
        for n, system in systems.items():
            log(f"  kvtier under pressure {n}: cold, spill, next request")
            out["cold"][str(n)] = ask(server, model, system, 0)
            spilled, waited = wait_until_spilled(server)
            out["after_pressure"][str(n)] = dict(ask(server, model, system, 1), spilled=spilled,
                                                 spill_wait_seconds=round(waited, 2))
    return out


def run_ttft(model: Path, systems: dict[int, str], work: Path) -> dict:
    log("part 1: time to first token by prefix length")
    kv = ttft_by_length(Server.kvtier(model, work / "ttft-cache", work / "ttft-kvtier.log"), str(model), systems)
    pressure = ttft_after_pressure(
        Server.kvtier(model, work / "pressure-cache", work / "pressure.log", *PRESSURE_ARGS), str(model), systems)
    ml = ttft_by_length(Server.mlx_lm(model, work / "ttft-mlx.log"), str(model), systems)
    kv["after_pressure"] = pressure["after_pressure"]
    kv["cold_pressure_run"] = pressure["cold"]
    ml["after_pressure"] = NO_PRESSURE
    return {"lengths": [int(n) for n in systems], "kvtier": kv, "mlx_lm.server": ml,
            "server_args": {"after_pressure": list(PRESSURE_ARGS)}}
