"""Health, cache inspection and management routes, and Prometheus metrics."""

from __future__ import annotations

import asyncio

from aiohttp import web

from kvtier import ops
from kvtier.config import parse_duration, parse_size
from kvtier.local import LocalDisk

from ..errors import ApiError, field, json_body
from ..state import STATE
from .openai import parse_messages
from .tools import check_openai_tools

routes = web.RouteTableDef()


@routes.get("/health")
async def health(http: web.Request) -> web.Response:
    state = http.app[STATE]
    worker = state.worker
    if worker.engine is None:
        status = "error" if worker.load_error else "loading"
        return web.json_response({"status": status, "error": worker.load_error}, status=503)
    store = worker.engine.store
    body = {"status": "ok", "model": state.model_id(), "waiting_requests": worker.waiting,
            "disk_writable": store.disk_error is None, "disk_error": store.disk_error,
            "batching": _batching(worker)}
    if store.shared is not None:  # an unreachable shared store degrades nothing: still "ok"
        body.update(shared_connected=store.shared.connected, shared_error=store.shared.error)
    return web.json_response(body)


def _batching(worker) -> dict:
    info = worker.describe()
    return {k: info[k] for k in ("enabled", "max_batch", "reason", "max_logprob_difference", "running")}


@routes.get("/cache/stats")
async def cache_stats(http: web.Request) -> web.Response:
    state = http.app[STATE]
    engine = state.engine()
    stats = engine.store.stats()
    counters = stats["counters"]
    stats.update({
        "model": state.model_id(),
        "fingerprint": engine.fingerprint,
        "prefix_reuse": engine.reusable,
        "hits": counters.get("requests_hit", 0),
        "misses": counters.get("requests_miss", 0),
        "half_cached": counters.get("requests_half_cached", 0),
        "hit_rate": ops.rates(counters)["hit_rate"],  # weighted by tokens
        "tokens": {"from_ram": counters.get("tokens_from_ram", 0),
                   "from_disk": counters.get("tokens_from_disk", 0),
                   "from_shared": counters.get("tokens_from_shared", 0),
                   "computed": counters.get("tokens_computed", 0)},
        "batch": state.worker.describe(),
    })
    return web.json_response(stats)


def _cache_dir(http: web.Request) -> LocalDisk:
    return http.app[STATE].engine().store.disk  # the CLI's operations, on the daemon's own disk tier


@routes.get("/cache/entries")
async def cache_entries(http: web.Request) -> web.Response:
    """Cached prefixes, as `kvtier ls --json` lists them, with the tier they are in now."""
    store = http.app[STATE].engine().store
    await asyncio.to_thread(store.writer.flush, 10.0)  # list what is being written too
    found = await asyncio.to_thread(ops.prefixes, _cache_dir(http))
    entries = []
    for prefix in found:
        hot = sum(1 for key in prefix.chain if key in store.ram)
        tier = "ram+disk" if hot == len(prefix.chain) else ("partly ram" if hot else "disk")
        entries.append(dict(prefix.to_json(), tier=tier))
    return web.json_response({"object": "list", "data": entries})


@routes.delete("/cache")
async def purge_cache(http: web.Request) -> web.Response:
    """The filters of `kvtier purge`, as query parameters: all, model, older_than, to_size."""
    query = http.query
    try:
        older = parse_duration(query["older_than"]) if "older_than" in query else None
        to_size = parse_size(query["to_size"]) if "to_size" in query else None
    except ValueError as exc:
        raise ApiError(400, str(exc), param="older_than" if "older_than" in query else "to_size") from None
    everything = query.get("all", "").lower() in ("1", "true", "yes")
    model = query.get("model")
    if not (everything or model or older is not None or to_size is not None):
        raise ApiError(400, "give at least one of all=true, model, older_than, to_size")
    state = http.app[STATE]
    result = await asyncio.to_thread(ops.purge, _cache_dir(http), everything=everything,
                                     model=model, older_than_s=older, to_size=to_size)
    if everything or (model and model in state.model_ids() | {state.engine().fingerprint}):
        state.engine().store.ram.clear()  # the hot copies of what was purged go too
    return web.json_response(result)


@routes.post("/cache/warm")
async def warm(http: web.Request) -> web.Response:
    """Prefill {messages, tools} (or {prompt}: a system prompt) and persist it; pin on request."""
    body = await json_body(http)
    state = http.app[STATE]
    state.engine()
    if "messages" in body:
        messages = parse_messages(body)
    else:
        messages = [{"role": "system", "content": field(body, "prompt", str, required=True)}]
    tools = check_openai_tools(field(body, "tools", list, None) or []) or None
    pin = field(body, "pin", bool, False)
    result = await state.worker.call(lambda engine: engine.warm(messages, tools, pin=pin))
    return web.json_response(result)


@routes.get("/metrics")
async def metrics(http: web.Request) -> web.Response:
    """Prometheus text exposition of the tiers and counters."""
    state = http.app[STATE]
    stats = state.engine().store.stats()
    counters = stats["counters"]
    lines = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP kvtier_{name} {help_text}", f"# TYPE kvtier_{name} {kind}"])
        lines.extend(f"kvtier_{name}{labels} {value}" for labels, value in samples)

    metric("ram_bytes", "gauge", "Bytes of KV in the hot tier.", [("", stats["ram"]["bytes"])])
    metric("ram_budget_bytes", "gauge", "RAM budget.", [("", stats["ram"]["budget"])])
    metric("ram_pending_bytes", "gauge", "Bytes in RAM waiting for their disk write (may exceed the budget).",
           [("", stats["ram"]["pending_bytes"])])
    metric("ram_entries", "gauge", "Blocks and snapshots in RAM.", [("", stats["ram"]["entries"])])
    metric("disk_bytes", "gauge", "Bytes of cache files on disk.", [("", stats["disk"]["bytes"])])
    metric("disk_budget_bytes", "gauge", "Disk budget.", [("", stats["disk"]["budget"])])
    metric("disk_entries", "gauge", "Blocks and snapshots on disk.", [("", stats["disk"]["entries"])])
    metric("disk_writable", "gauge", "1 while the disk tier accepts writes.",
           [("", int(stats["disk"]["writable"]))])
    metric("requests_total", "counter", "Requests by whether any prefix was reused.",
           [('{result="hit"}', counters.get("requests_hit", 0)),
            ('{result="miss"}', counters.get("requests_miss", 0))])
    metric("requests_half_cached_total", "counter",
           "Requests that took at least half their prompt from the cache.",
           [("", counters.get("requests_half_cached", 0))])
    metric("prompt_tokens_total", "counter", "Prompt tokens by where they came from.",
           [(f'{{source="{s}"}}', counters.get(f"tokens_{k}", 0))
            for s, k in (("ram", "from_ram"), ("disk", "from_disk"), ("shared", "from_shared"),
                         ("computed", "computed"))])
    if stats["shared"] is not None:
        metric("shared_connected", "gauge", "1 while the shared store is reachable.",
               [("", int(stats["shared"]["connected"]))])
        metric("shared_queued_bytes", "gauge", "Bytes waiting for their upload to the shared store.",
               [("", stats["shared"]["queued_bytes"])])
    for name, help_text in [("damaged_blocks", "Cache files found damaged (treated as misses)."),
                            ("disk_evictions", "Entries evicted to keep the disk budget."),
                            ("disk_write_errors", "Failed cache writes."),
                            ("memory_pressure_events", "Hot-tier spills under memory pressure."),
                            ("ram_evictions_unwritten", "Entries evicted from RAM with no copy on disk."),
                            ("requests_unsupported_model", "Requests served without reuse."),
                            ("client_disconnects", "Streams whose client went away before the end."),
                            ("shared_hits", "Blocks and snapshots read from the shared store."),
                            ("shared_uploads", "Entries uploaded to the shared store."),
                            ("shared_uploads_dropped", "Uploads dropped (queue full or store down)."),
                            ("shared_errors", "Failed calls to the shared store."),
                            ("shared_damaged", "Shared values that failed their checks (misses).")]:
        metric(f"{name}_total", "counter", help_text, [("", counters.get(name, 0))])
    metric("waiting_requests", "gauge", "Requests queued for the MLX thread.",
           [("", state.worker.waiting)])
    batch = state.worker.describe()
    metric("batch_enabled", "gauge", "1 when requests are decoded in one batch.", [("", int(batch["enabled"]))])
    metric("batch_size", "gauge", "Requests in the running batch (prefilling or decoding).",
           [("", batch["running"])])
    metric("batch_max", "gauge", "Most requests served at once (--max-batch).", [("", batch["max_batch"])])
    metric("queue_wait_seconds_total", "counter", "Seconds requests spent queued before they started.",
           [("", batch["queue_wait_seconds_total"])])
    metric("admitted_requests_total", "counter", "Requests taken off the queue.",
           [("", batch["admitted_requests"])])
    for phase in ("prefill", "decode"):
        metric(f"{phase}_tokens_total", "counter", f"Tokens computed while {phase[:-1]}ing.",
               [("", batch[f"{phase}_tokens"])])
        metric(f"{phase}_seconds_total", "counter", f"Seconds spent {phase[:-1]}ing.",
               [("", batch[f"{phase}_seconds"])])
        metric(f"{phase}_tokens_per_second", "gauge", f"{phase.capitalize()} tokens per second since start-up.",
               [("", batch[f"{phase}_tokens_per_second"] or 0)])
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")
