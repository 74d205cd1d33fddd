"""bench/parallel.py's results as targets (pass/fail lines), a markdown section and a plot.

Kept apart from the measuring so it can be rerun on a saved parallel.json
(`python bench/parallel.py --render`) and tested without servers."""

from __future__ import annotations

import statistics
from pathlib import Path

PEER = "mlx_lm.server"
PLAIN = "plain mlx-lm"


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(mine: float | None, theirs: float | None) -> float | None:
    return mine / theirs if mine is not None and theirs else None


def kvtier_servers(results: dict) -> list[str]:
    return [name for name in results["servers"] if name != PEER]


def decode_rate(results: dict, server: str, n: int) -> float | None:
    """Median over trials of the aggregate decode tok/s at N streams."""
    return median(results["servers"][server]["decode"].get(str(n), []))


def agents_wall(results: dict, server: str, kind: str, n: int) -> float | None:
    """Total wall seconds of N conversations x the rounds (the rounds' walls added)."""
    walls = results["servers"][server]["agents"].get(kind, {}).get(str(n))
    return sum(walls) if walls else None


def single_stream_ratio(results: dict, server: str) -> float | None:
    """Median over trials of the server's single-stream decode tok/s / plain mlx-lm's in the same trial."""
    mine, plain = results["servers"][server].get("single", []), results.get("plain_decode", [])
    return median([m / p for m, p in zip(mine, plain) if p])


def cold(results: dict, server: str) -> dict:
    """The cold-prefill probe over its trials: the longest stall of any, the median TTFT ratio."""
    trials = results["servers"][server].get("cold", [])
    return {"longest_stall": max((t["longest_stall"] for t in trials), default=None),
            "longest_text_gap": max((t.get("longest_text_gap", t["longest_stall"]) for t in trials), default=None),
            "ttft_alone": median([t["ttft_alone"] for t in trials]),
            "ttft_beside": median([t["ttft_beside"] for t in trials]),
            "ttft_ratio": median([t["ttft_beside"] / t["ttft_alone"] for t in trials]),
            "decoders_ran_through": all(t["decoders_ran_through"] for t in trials)}


def _line(target: str, server: str, measured: float | None, needed: str, passed: bool | None) -> dict:
    return {"target": target, "server": server, "measured": measured, "needed": needed,
            "result": "n/a" if passed is None else ("pass" if passed else "FAIL")}


def _check(value: float | None, limit: float, at_least: bool) -> bool | None:
    if value is None:
        return None
    return value >= limit if at_least else value <= limit


def targets(results: dict) -> list[dict]:
    """Issue 33's targets for each kvtier configuration, against mlx_lm.server and plain mlx-lm."""
    lines = []
    for server in kvtier_servers(results):
        for n in (4, 8):
            value = ratio(decode_rate(results, server, n), decode_rate(results, PEER, n))
            lines.append(_line(f"aggregate decode at N = {n} / {PEER}'s", server, value, ">= 1.0x",
                               _check(value, 1.0, True)))
        value = ratio(agents_wall(results, server, "shared", 4), agents_wall(results, PEER, "shared", 4))
        lines.append(_line(f"agents (4 conversations x {results['rounds']} rounds, shared system prompt) "
                           f"wall / {PEER}'s", server, value, "<= 0.8x", _check(value, 0.8, False)))
        value = single_stream_ratio(results, server)
        lines.append(_line(f"single stream decode / {PLAIN}'s", server, value, ">= 0.97x", _check(value, 0.97, True)))
        probe = cold(results, server)
        lines.append(_line(f"longest decode stall while a cold {results['cold_tokens']}-token prompt prefills",
                           server, probe["longest_stall"], "<= 0.5 s", _check(probe["longest_stall"], 0.5, False)))
        lines.append(_line("cold TTFT beside decoders / alone", server, probe["ttft_ratio"], "<= 1.2x",
                           _check(probe["ttft_ratio"], 1.2, False)))
    return lines


def _value(line: dict) -> str:
    value = line["measured"]
    if value is None:
        return "n/a"
    return f"{value:.2f} s" if line["needed"].endswith(" s") else f"{value:.2f}x"


def target_lines(lines: list[dict]) -> list[str]:
    """One printable line per target: PASS/FAIL, what, who, measured vs needed."""
    return [f"{line['result'].upper():4} {line['server']}: {line['target']}: {_value(line)} (needed {line['needed']})"
            for line in lines]


def _mode(info: dict) -> str:
    """What `/health` said: the batching mode and the prefill chunk the server chose."""
    health = info["health"]
    batching, chunk = health.get("batching", {}), health.get("prefill_chunk") or {}
    return (f"batching `{batching.get('mode')}` ({batching.get('reason')}); prefill chunks of "
            f"{chunk.get('tokens', '?')} tokens ({chunk.get('chosen', '?')})")


def _number(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render(results: dict) -> str:
    """The `parallel` section of docs/benchmarks.md."""
    servers = list(results["servers"])
    out = [f"### Parallel requests ({results['machine']})", "",
           f"Command: `{results['command']}` ({results['seconds'] / 60:.1f} min; load average "
           f"{results['load']['start']} at the start, {results['load']['end']} at the end).", "",
           *[f"- {name}: {_mode(info)}" for name, info in results["servers"].items() if info.get("health")], "",
           "| target | server | measured | needed | result |", "|---|---|---:|---:|---|"]
    out += [f"| {t['target']} | {t['server']} | {_value(t)} | {t['needed']} | {t['result']} |"
            for t in results["targets"]]
    out += ["", f"Aggregate decode tok/s, {results['decode_tokens']} tokens per stream (median of "
            f"{results['trials']} trial{'s' * (results['trials'] != 1)}; one {results['single_tokens']}-token stream: "
            + ", ".join(f"{s} {_number(median(results['servers'][s].get('single', [])))}" for s in servers)
            + f", {PLAIN} {_number(median(results['plain_decode']))}):", "",
            "| server | " + " | ".join(f"N = {n}" for n in results["ns"]) + " |",
            "|---|" + "---:|" * len(results["ns"])]
    out += [f"| {s} | " + " | ".join(_number(decode_rate(results, s, n)) for n in results["ns"]) + " |"
            for s in servers]
    out += ["", f"Agents: N conversations x {results['rounds']} rounds, {results['agent_tokens']} tokens an "
            f"answer, a {results['system_tokens']}-token system prompt new to the server (shared by all N, or "
            "one each); total wall seconds:", "",
            "| server | prompt | " + " | ".join(f"N = {n}" for n in results["agent_ns"]) + " |",
            "|---|---|" + "---:|" * len(results["agent_ns"])]
    out += [f"| {s} | {kind} | " + " | ".join(_number(agents_wall(results, s, kind, n), 2)
                                             for n in results["agent_ns"]) + " |"
            for s in servers for kind in ("shared", "distinct")]
    out += ["", f"While {results['decoders']} streams decode, a cold {results['cold_tokens']}-token prompt "
            "arrives (median TTFT of the trials; the longest stall of any: a step's, i.e. a gap between "
            "two text chunks over the tokens the later one carried, where the server streams their "
            f"log-probabilities ({PEER} does not: its stall is the gap); and the longest gap between "
            "two text chunks):", "",
            f"| server | longest stall a step (s) | stall / {PEER}'s | longest gap between texts (s) "
            "| cold TTFT alone (s) | beside decoders (s) | ratio | decoders ran through |",
            "|---|---:|---:|---:|---:|---:|---:|---|"]
    for s in servers:
        c = cold(results, s)
        out.append(f"| {s} | {_number(c['longest_stall'], 2)} "
                   f"| {_number(ratio(c['longest_stall'], cold(results, PEER)['longest_stall']), 2)} "
                   f"| {_number(c['longest_text_gap'], 2)} "
                   f"| {_number(c['ttft_alone'], 2)} "
                   f"| {_number(c['ttft_beside'], 2)} | {_number(c['ttft_ratio'], 2)} "
                   f"| {'yes' if c['decoders_ran_through'] else 'no'} |")
    out += ["", "![Parallel requests](bench/parallel.png)"]
    return "\n".join(out) + "\n"


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (decode, agents, probe) = plt.subplots(1, 3, figsize=(15, 4.5))
    _plot_decode(decode, results)
    _plot_agents(agents, results)
    _plot_cold(probe, results)
    fig.suptitle(f"Parallel requests: kvtier vs {PEER} ({results['model_name']}, {results['date']})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_decode(ax, results: dict) -> None:
    for server in results["servers"]:
        ax.plot(results["ns"], [decode_rate(results, server, n) or 0 for n in results["ns"]], marker="o", label=server)
    plain = median(results["plain_decode"])
    if plain:
        ax.axhline(plain, color="grey", linestyle=":", label=f"{PLAIN}, one {results['single_tokens']}-token stream")
    ax.set(title=f"Aggregate decode ({results['decode_tokens']} tokens a stream)", xlabel="concurrent streams",
           ylabel="tokens/s, all streams", xticks=results["ns"])
    ax.legend(fontsize="small")


def _plot_agents(ax, results: dict) -> None:
    for i, server in enumerate(results["servers"]):
        for kind, style, marker in (("shared", "-", "o"), ("distinct", "--", "s")):
            walls = [agents_wall(results, server, kind, n) or 0 for n in results["agent_ns"]]
            ax.plot(results["agent_ns"], walls, style, marker=marker, color=f"C{i}", label=f"{server}, {kind} prompt")
    ax.set(title=f"Agents: N conversations x {results['rounds']} rounds", xlabel="conversations",
           ylabel="wall time (s)", xticks=results["agent_ns"])
    ax.legend(fontsize="x-small", loc="upper left")


def _plot_cold(ax, results: dict) -> None:
    servers = list(results["servers"])
    probes = [cold(results, s) for s in servers]
    xs = range(len(servers))
    ax.bar([x - 0.2 for x in xs], [p["longest_stall"] or 0 for p in probes], 0.4, label="longest decode stall (s)")
    ax.bar([x + 0.2 for x in xs], [p["ttft_ratio"] or 0 for p in probes], 0.4, label="cold TTFT beside / alone")
    ax.axhline(0.5, color="C0", linestyle=":", label="stall target 0.5 s")
    ax.axhline(1.2, color="C1", linestyle=":", label="TTFT target 1.2x")
    ax.set_xticks(list(xs), servers, fontsize="small", rotation=10)
    ax.set(title=f"A cold {results['cold_tokens']}-token prompt beside {results['decoders']} decoders")
    ax.legend(fontsize="small")
