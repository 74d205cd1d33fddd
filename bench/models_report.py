"""bench/models.py's results as targets (pass/fail lines), a markdown section and a plot.

Kept apart from the measuring so it can be rerun on a saved models.json
(`python bench/models.py --render`) and tested without servers."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

KVTIER = "kvtier"
SWITCH_BACK_FACTOR = 1.5  # the first turn back on a model <= its load time + this x a warm turn's TTFT
TOTAL_LIMIT = 0.3  # kvtier's session TTFT <= this x mlx_lm.server's


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def peers(results: dict) -> list[str]:
    """The servers kvtier is measured against: every mlx_lm.server configuration."""
    return [name for name in results["servers"] if name != KVTIER]


def blocks(results: dict) -> list[tuple[str, list[int]]]:
    """The session's blocks: (model, the turn numbers served on it in a row)."""
    out: list[tuple[str, list[int]]] = []
    for turn, model in enumerate(results["schedule"]):
        if out and out[-1][0] == model:
            out[-1][1].append(turn)
        else:
            out.append((model, [turn]))
    return out


def kinds(results: dict) -> list[str]:
    """Each turn's kind: "cold" (a model's first turn), "switch back" (the first turn of a
    later block on it) or "warm" (any other turn of a block)."""
    out = ["warm"] * len(results["schedule"])
    seen: set[str] = set()
    for model, turns in blocks(results):
        out[turns[0]] = "switch back" if model in seen else "cold"
        seen.add(model)
    return out


def ttfts(results: dict, server: str) -> list[float]:
    return [turn["ttft"] for turn in results["servers"][server]["turns"]]


def turns_of(results: dict, server: str, model: str, kind: str) -> list[float]:
    """The TTFTs of one model's turns of one kind on a server."""
    return [t for t, m, k in zip(ttfts(results, server), results["schedule"], kinds(results))
            if m == model and k == kind]


def load_seconds(results: dict, model: str) -> float | None:
    """The model's load time: the median of plain `mlx_lm.load`s in the bench's process."""
    return median(results["models"][model]["load_seconds"])


def switch_back(results: dict, model: str) -> dict:
    """kvtier's first turns back on a model, each against its own limit: load + 1.5x the TTFT
    of the warm turns of its block (the same conversation a turn or two later: a warm turn's
    cost grows with the conversation, so a late switch-back is held to late warm turns, an
    early one to early ones). The one closest to (or furthest past) its limit is shown."""
    load, every_warm = load_seconds(results, model), median(turns_of(results, KVTIER, model, "warm"))
    times, kind = ttfts(results, KVTIER), kinds(results)
    worst: dict = {"warm": every_warm, "load": load, "worst": None, "limit": None, "count": 0}
    for name, turns in blocks(results):
        if name != model or kind[turns[0]] != "switch back":
            continue
        warm = median([times[t] for t in turns[1:]]) or every_warm  # a block of one turn: all warm turns
        limit = load + SWITCH_BACK_FACTOR * warm if warm is not None and load is not None else None
        back = times[turns[0]]
        worst["count"] += 1
        if limit is not None and (worst["limit"] is None or back / limit > worst["worst"] / worst["limit"]):
            worst.update(warm=warm, worst=back, limit=limit)
    return worst


def total_ratio(results: dict, peer: str) -> float | None:
    theirs = sum(ttfts(results, peer))
    return sum(ttfts(results, KVTIER)) / theirs if theirs else None


def mismatches(results: dict, peer: str) -> list[int]:
    """The turns whose answers differ between kvtier and a peer (greedy: they should not)."""
    mine, theirs = results["servers"][KVTIER]["turns"], results["servers"][peer]["turns"]
    return [i for i, (a, b) in enumerate(zip(mine, theirs)) if a["text"] != b["text"]]


def _line(target: str, measured: float | None, shown: str, needed: str, passed: bool | None) -> dict:
    return {"target": target, "measured": measured, "shown": shown, "needed": needed,
            "result": "n/a" if passed is None else ("pass" if passed else "FAIL")}


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


def _switch_back_line(results: dict, model: str) -> dict:
    s = switch_back(results, model)
    passed = None if s["worst"] is None or s["limit"] is None else s["worst"] <= s["limit"]
    return _line(f"{KVTIER}: first turn back on {model} <= its load + {SWITCH_BACK_FACTOR}x a warm turn's TTFT "
                 f"(each of {s['count']} against its block's warm turns; the closest shown)", s["worst"],
                 _seconds(s["worst"]), f"<= {_seconds(s['limit'])} ({_seconds(s['load'])} + "
                 f"{SWITCH_BACK_FACTOR} x {_seconds(s['warm'])})", passed)


def targets(results: dict) -> list[dict]:
    """Issue 31's targets: the switch-back per model, then for each mlx_lm.server configuration
    the total session TTFT and the answers turn by turn."""
    lines = [_switch_back_line(results, model) for model in results["models"]]
    turns = len(results["schedule"])
    for peer in peers(results):
        value = total_ratio(results, peer)
        lines.append(_line(f"{KVTIER}: total session TTFT / {peer}'s", value,
                           "n/a" if value is None else f"{value:.2f}x", f"<= {TOTAL_LIMIT}x",
                           None if value is None else value <= TOTAL_LIMIT))
        differ = mismatches(results, peer)
        lines.append(_line(f"{KVTIER}'s answers equal {peer}'s turn by turn", turns - len(differ),
                           f"{turns - len(differ)} of {turns}", f"{turns} of {turns}", not differ))
    return lines


def target_lines(lines: list[dict]) -> list[str]:
    """One printable line per target: PASS/FAIL, what, measured vs needed."""
    return [f"{line['result'].upper():4} {line['target']}: {line['shown']} (needed {line['needed']})"
            for line in lines]


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f} MiB"


def _describe(results: dict) -> list[str]:
    models = results["models"]
    out = [f"### Two models, one agent session ({results['machine']})", "",
           f"Command: `{results['command']}` ({results['seconds'] / 60:.1f} min; load average "
           f"{results['load']['start']} at the start, {results['load']['end']} at the end).", ""]
    out += [f"- `{name}`: generated {m['arch']}, hidden {m['hidden']}, {m['layers']} layers, float32: "
            f"{_mib(m['weight_bytes'])} of weights, loaded by `mlx_lm.load` in {_seconds(load_seconds(results, name))} "
            f"(median of {len(m['load_seconds'])}); {m['kv_bytes_per_token'] / 1024:.1f} KiB of KV a token (a cache's bytes at 256 tokens, "
            "recurrent state included)"
            for name, m in models.items()]
    out += [f"- session: {len(results['schedule'])} turns, {results['turns_per_block']} on a model then "
            f"{results['turns_per_block']} on the other; each model its own conversation on a "
            f"~{results['system_tokens']}-token system prompt; {results['max_tokens']} tokens an answer, greedy",
            *[f"- {name}: `{info['flags']}`; peak RSS {_mib(info.get('peak_rss'))}"
              for name, info in results["servers"].items()], ""]
    return out


def kvtier_load_at(results: dict) -> dict[int, float]:
    """kvtier's load (its log's seconds) behind each block's first turn: a model's k-th load
    is its k-th block's, when it loaded once a block (every switch unloaded the other)."""
    loads = results["servers"][KVTIER].get("loads") or {}
    out: dict[int, float] = {}
    for model in results["models"]:
        firsts = [turns[0] for name, turns in blocks(results) if name == model]
        if len(loads.get(model, [])) == len(firsts):
            out.update(zip(firsts, loads[model]))
    return out


def _loads_line(results: dict) -> list[str]:
    loads = results["servers"][KVTIER].get("loads") or {}
    if not loads:
        return []
    runs = {name: sum(model == name for model, _ in blocks(results)) for name in results["models"]}
    return ["", "kvtier's log: " + "; ".join(
        f"{name} loaded {len(seconds)} times for its {runs.get(name)} blocks of turns, in "
        + ", ".join(f"{v:.1f}" for v in seconds) + " s" for name, seconds in loads.items())
        + " (one load a block: every switch unloaded the other model; each model's prefill chunk fit is "
        "timed once a machine, at the daemon's start-up for a model loaded on demand, and kept in the cache "
        "directory; batched decode is measured at start-up, or in idle time for a model loaded on demand)."
        + _unloads(results)]


def _unloads(results: dict) -> str:
    unloads = results["servers"][KVTIER].get("unloads")
    if not unloads:
        return ""
    return (" Before each load, unloading the other model (its weights released, its hot KV queued for the SSD and written meanwhile) took "
            + ", ".join(f"{v:.2f}" for v in unloads) + " s, also within the switching turn's TTFT.")


def _load_cell(loads: dict[int, float], turn: int) -> str:
    if turn not in loads:
        return ""
    # The first model loads as the daemon starts (as mlx_lm.server's does), before the session.
    return _seconds(loads[turn]) + (" (at start-up)" if turn == 0 else "")


def _turn_rows(results: dict) -> list[str]:
    servers = list(results["servers"])
    rows = ["| # | model | turn | prompt tokens | " + " | ".join(f"{s} TTFT (cached)" for s in servers)
            + " | kvtier's load | kvtier's answer equals theirs |", "|---:|---|---|---:|" + "---:|" * (len(servers) + 1)
            + "---|"]
    loads = kvtier_load_at(results)
    for i, (model, kind) in enumerate(zip(results["schedule"], kinds(results))):
        cells = [f"{s['turns'][i]['ttft']:.2f} s ({s['turns'][i]['cached_tokens']})"
                 for s in results["servers"].values()]
        differ = [p for p in peers(results) if i in mismatches(results, p)]
        equal = "yes" if not differ else "differs from " + ", ".join(differ)
        rows.append(f"| {i + 1} | {model} | {kind} | {results['servers'][KVTIER]['turns'][i]['prompt_tokens']} | "
                    + " | ".join(cells) + f" | {_load_cell(loads, i)} | {equal} |")
    return rows


def render(results: dict) -> str:
    """The `models` section of docs/benchmarks.md."""
    out = _describe(results)
    out += ["| target | measured | needed | result |", "|---|---:|---:|---|"]
    out += [f"| {t['target']} | {t['shown']} | {t['needed']} | {t['result']} |" for t in results["targets"]]
    out += _loads_line(results)
    out += ["", "Total TTFT: " + ", ".join(f"{s} {sum(ttfts(results, s)):.1f} s" for s in results["servers"]) + ".",
            "", _cold_floor_line(results),
            "", "Per turn (TTFT, prompt tokens the server reported as cached):", "", *_turn_rows(results)]
    if results.get("reference"):
        out += ["", "Where answers differed, plain `mlx_lm.generate` on the same messages: "
                + "; ".join(f"turn {int(i) + 1} equals {', '.join(r['equal']) or 'neither'}"
                            for i, r in results["reference"].items()) + "."]
    out += ["", "![Two models, one agent session](bench/models.png)"]
    return "\n".join(out) + "\n"


def cold_turns(results: dict, server: str) -> float:
    """The TTFT of the models' first turns: their prompts are new to every server."""
    return sum(t for t, k in zip(ttfts(results, server), kinds(results)) if k == "cold")


def _cold_floor_line(results: dict) -> str:
    """What the total session target can be against each peer: kvtier's cold turns alone, a
    floor no cache lowers, as a share of the peer's whole session."""
    floor = cold_turns(results, KVTIER)
    shares = ", ".join(f"{floor / sum(ttfts(results, p)):.2f}x {p}'s session" for p in peers(results)
                       if sum(ttfts(results, p)))
    return (f"kvtier's {sum(k == 'cold' for k in kinds(results))} cold turns alone (each model's first: nothing "
            f"to reuse) took {floor:.1f} s: {shares}. That is the lowest total session ratio any cache could reach.")


def _two_and_five(y: float, _: object) -> str:
    """A log axis's minor labels: 0.2 and 0.5, 2 and 5, ... (all nine crowd it)."""
    return f"{y:g}" if y > 0 and round(y / 10 ** math.floor(math.log10(y))) in (2, 5) else ""


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(13, 5))
    turns = list(range(1, len(results["schedule"]) + 1))
    for i, (model, numbers) in enumerate(blocks(results)):
        ax.axvspan(numbers[0] + 0.5, numbers[-1] + 1.5, color=f"C{list(results['models']).index(model) + 5}",
                   alpha=0.12, label=f"turns on {model}" if i < len(results["models"]) else None)
        if i:
            ax.axvline(numbers[0] + 0.5, color="grey", linestyle=":", linewidth=1)
    for server in results["servers"]:
        ax.plot(turns, ttfts(results, server), marker="o", label=server)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda y, _: f"{y:g}"))  # 0.1, not 10^-1
    ax.yaxis.set_minor_formatter(plt.FuncFormatter(_two_and_five))
    ax.set(title=f"Two models alternating in one agent session: TTFT per turn ({results['date']})",
           xlabel="turn (dotted: the model switches)", ylabel="time to first token (s, log)", xticks=turns)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # beside: the points fill the axes
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
