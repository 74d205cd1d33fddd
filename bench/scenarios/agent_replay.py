"""Part 2: an agent-trace replay (prompts.build_trace: a long system prompt with tools, tool
results, retries and compactions, one restart) against kvtier, mlx_lm.server and kvtier with
its cache off; the no-cache baseline is measured on a subset and interpolated."""

from __future__ import annotations

from pathlib import Path

from harness import Server, log, record, stream_chat
from prompts import EDIT_EVERY, TraceRequest, agent_system_prompt, build_trace

BASELINE_EVERY = 5  # no-cache baseline: measure every 5th request, interpolate the rest
NO_CACHE_ARGS = ["--ram-budget", "0", "--disk-budget", "0"]


def replay(server: Server, model: str, trace: list[TraceRequest], indices: list[int],
           restart_before: int | None) -> list[dict]:
    """Send trace[i] for i in indices, restarting the server once before `restart_before`.
    No warm-up request: replayed as an agent sends it."""
    out = []
    with server:
        for i in indices:
            if i == restart_before:
                log(f"  {server.name}: restart before request {i + 1}")
                server.restart()
            timed = stream_chat(server, model, trace[i].messages)
            label = "after restart" if i == restart_before else trace[i].label
            out.append(dict(record(timed), index=i, label=label))
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
    nc = replay(Server.kvtier(model, work / "nocache-cache", work / "nocache.log", *NO_CACHE_ARGS), str(model),
                trace, subset, None)
    estimate = no_cache_estimate(nc, [r["prompt_tokens"] for r in kv])
    return {"requests": count, "system_tokens": system_tokens, "restart_before_request": restart_at + 1,
            "edit_every": EDIT_EVERY, "labels": [t.label for t in trace],
            "kvtier": {"records": kv, "summary": summarise_replay(kv)},
            "mlx_lm.server": {"records": ml, "summary": summarise_replay(ml)},
            "no_cache": {"server_args": list(NO_CACHE_ARGS),
                         "measured": nc, "measured_indices": subset,
                         "estimated_ttft": [round(t, 4) for t in estimate],
                         "estimated_total_ttft": sum(estimate),
                         "method": "piecewise-linear interpolation of TTFT over prompt tokens"},
            "identical_texts": sum(a["text"] == b["text"] for a, b in zip(kv, ml))}
