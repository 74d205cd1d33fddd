"""How bench/suite.py reports: the target pass/fail checks, the plots, and the markdown
section of docs/benchmarks.md, all from the raw results (suite.json) the scenarios return."""

from __future__ import annotations

import json
from pathlib import Path

import memory
import scale
import steps
from harness import table, target_table, write_section
from scenarios.agent_replay import BASELINE_EVERY

SCENARIOS = [("cold", "cold"), ("warm", "warm, new question"), ("after_restart", "after restart"),
             ("after_pressure", "after memory pressure")]


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
    checks += [("restore bandwidth >= 90% of raw read (kvtier serve, after restart, median of 3 trials)", results["restore"]["ratio"], ">= 90%",
                results["restore"]["ratio"] >= 0.9),
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


# -- markdown ----------------------------------------------------------------------------------
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
    k, raw, parallel = restore["restored"]["kvtier"] or {}, restore["raw_read"], restore["parallel_read"]
    drops = restore["drop_caches"]
    dropped = "worked" if all(d["ok"] for d in drops.values()) else \
        f"failed ({drops['before_restore']['error']}); both reads may come from the page cache"
    rows = [["kvtier restore (after restart)", f"{k.get('restored_bytes', 0) / 1e6:.1f} MB",
             f"{k.get('restore_seconds', 0):.3f} s", f"{restore['restore_gb_per_s']:.2f} GB/s"],
            [f"raw sequential read ({raw['files']} files)", f"{raw['bytes'] / 1e6:.1f} MB",
             f"{raw['seconds']:.3f} s", f"{raw['gb_per_s']:.2f} GB/s"],
            [f"raw read, {parallel['streams']} files at a time", f"{parallel['bytes'] / 1e6:.1f} MB",
             f"{parallel['seconds']:.3f} s", f"{parallel['gb_per_s']:.2f} GB/s"]]
    trials = ", ".join(f"{100 * r:.0f}%" for r in restore["ratios"])
    parallel_trials = ", ".join(f"{100 * r:.0f}%" for r in restore["parallel_ratios"])
    return table(["", "bytes", "time", "bandwidth"], rows, ["---", "---:", "---:", "---:"]) + [
        "", f"Restore = {100 * restore['ratio']:.0f}% of the raw sequential read in the median of "
            f"{len(restore['ratios'])} trials ({trials}; the table is that trial), and "
            f"{parallel_trials} of a raw read {parallel['streams']} files at a time, as the restore's "
            f"reader threads read. The restoring request's TTFT: "
            f"{restore['restored']['ttft']:.3f} s ({k.get('disk_tokens', 0)} tokens from disk; cold "
            f"{restore['cold']['ttft']:.3f} s). Each trial restarts kvtier on a copy of the cache; its "
            f"files evicted from the page cache before each read (`posix_fadvise(DONTNEED)`): {dropped}."]


def render_decode(decode: dict) -> list[str]:
    rows = [["mlx_lm.stream_generate", f"{decode['mlx_lm_tps']:.1f}", "100%"],
            ["kvtier scheduler.generate", f"{decode['kvtier_tps']:.1f}", f"{100 * decode['ratio']:.1f}%"]]
    return table(["", "decode tokens/s (median)", "% of mlx-lm (median of paired ratios)"], rows,
                 ["---", "---:", "---:"]) + [
        "", f"{decode['max_tokens']} greedy tokens after a {decode['prompt_tokens']}-token prompt, "
            f"{decode['repeats']} interleaved pairs of runs, timed from the first streamed token to the last. "
            f"Both ran to max_tokens: {'yes' if decode['same_token_counts'] else 'NO'}; identical texts: "
            f"{'yes' if decode['identical_texts'] else 'NO'}."]


def render(results: dict) -> str:
    ttft, agent = results["ttft"], results["agent"]
    return "\n".join([
        "## Benchmark suite: kvtier vs mlx_lm.server", "",
        f"Measured {results['date']} on {results['machine']}.",
        f"Model: generated llama, hidden 512, 8 layers, float32 (`{results['model']}`). "
        f"Command: `{results['command']}` ({results['seconds'] / 60:.1f} min).", "",
        "### Targets", "", *target_table(results["targets"]), "",
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
        *large_cache_sections(results),
    ])


def large_cache_sections(results: dict) -> list[str]:
    """Parts 5 and 6, in a suite.json that has them (older ones do not)."""
    if "scale" not in results:
        return []
    sections = ["### Large caches (bench/scale.py)", "", *scale.table(results["scale"]), "",
                "### Memory (bench/memory.py)", "", *memory.table(results["memory"])]
    if "steps" in results:  # part 7, in suite.json files from when it was added
        sections += ["", "### Per-request steps (bench/steps.py)", "", *steps.table(results["steps"]), "",
                     *steps.serve_lines(results["steps"]), "", *steps.prefetch_trial_lines(results["steps"]),
                     *steps.bandwidth_lines(results["steps"])]
    return sections


def write_outputs(results: dict, out: Path) -> None:
    (out / "bench").mkdir(parents=True, exist_ok=True)
    (out / "bench" / "suite.json").write_text(json.dumps(results, indent=2))
    plot_ttft(results["ttft"], out / "bench" / "suite_ttft.png")
    plot_agent(results["agent"], out / "bench" / "suite_agent.png")
    write_section("suite", render(results), out / "benchmarks.md")
