"""GET /metrics: the store's tiers and counters in Prometheus' text format, read at scrape
time by a collector in the app's own registry (several apps may share a process: tests)."""

from __future__ import annotations

from typing import Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .state import STATE, DaemonState

_REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)

# (metric, help, tier, field) read from the store's stats()
_GAUGES = [
    ("ram_bytes", "Bytes of KV in the hot tier.", "ram", "bytes"),
    ("ram_budget_bytes", "RAM budget.", "ram", "budget"),
    ("ram_pending_bytes", "Bytes in RAM waiting for their disk write (may exceed the budget).",
     "ram", "pending_bytes"),
    ("ram_entries", "Blocks and snapshots in RAM.", "ram", "entries"),
    ("disk_bytes", "Bytes of cache files on disk.", "disk", "bytes"),
    ("disk_budget_bytes", "Disk budget.", "disk", "budget"),
    ("disk_entries", "Blocks and snapshots on disk.", "disk", "entries"),
    ("disk_writable", "1 while the disk tier accepts writes.", "disk", "writable"),
]
# Counters exported with a label: (metric, help, label, {label value: counter})
_LABELLED = [
    ("requests", "Requests by whether any prefix was reused.", "result",
     {"hit": "requests_hit", "miss": "requests_miss"}),
    ("prompt_tokens", "Prompt tokens by where they came from.", "source",
     {"ram": "tokens_from_ram", "disk": "tokens_from_disk", "shared": "tokens_from_shared",
      "computed": "tokens_computed"}),
]
# Counters always exported (0 until counted); any other counter the store keeps is exported too.
_COUNTERS = {
    "requests_half_cached": "Requests that took at least half their prompt from the cache.",
    "requests_live": "Requests that took over a live cache (an earlier request's, trimmed; no copy).",
    "tokens_from_live": "Prompt tokens of live caches taken over (counted in source=ram too).",
    "damaged_blocks": "Cache files found damaged (treated as misses).",
    "disk_evictions": "Entries evicted to keep the disk budget.",
    "disk_write_errors": "Failed cache writes.",
    "memory_pressure_events": "Hot-tier spills under memory pressure.",
    "ram_evictions_unwritten": "Entries evicted from RAM with no copy on disk.",
    "requests_unsupported_model": "Requests served without reuse.",
    "client_disconnects": "Streams whose client went away before the end.",
}
# With --shared only: the shared tier's gauges and counters.
_SHARED_GAUGES = [("shared_connected", "1 while the shared store is reachable.", "connected"),
                  ("shared_queued_bytes", "Bytes waiting for their upload to the shared store.", "queued_bytes")]
_SHARED_COUNTERS = {
    "shared_hits": "Blocks and snapshots read from the shared store.",
    "shared_uploads": "Entries uploaded to the shared store.",
    "shared_uploads_dropped": "Uploads dropped (queue full or store down).",
    "shared_errors": "Failed calls to the shared store.",
    "shared_damaged": "Shared values that failed their checks (misses).",
}


class StoreCollector(Collector):
    def __init__(self, state: DaemonState):
        self.state = state

    def collect(self) -> Iterator[Metric]:
        engine = self.state.worker.engine
        if engine is None:
            return
        stats = engine.store.stats()
        for name, help_text, tier, key in _GAUGES:
            yield GaugeMetricFamily(f"kvtier_{name}", help_text, value=float(stats[tier][key]))
        counters = stats["counters"]
        labelled = set()
        for name, help_text, label, sources in _LABELLED:
            family = CounterMetricFamily(f"kvtier_{name}", help_text, labels=[label])
            for value, counter in sources.items():
                family.add_metric([value], counters.get(counter, 0))
                labelled.add(counter)
            yield family
        known = _COUNTERS | (_SHARED_COUNTERS if stats["shared"] is not None else {})
        for name, help_text, key in _SHARED_GAUGES if stats["shared"] is not None else ():
            yield GaugeMetricFamily(f"kvtier_{name}", help_text, value=float(stats["shared"][key]))
        names = dict.fromkeys(known) | dict.fromkeys(sorted(set(counters) - labelled))
        for name in names:
            help_text = known.get(name, f"The store's '{name}' counter.")
            yield CounterMetricFamily(f"kvtier_{name}", help_text, value=counters.get(name, 0))
        yield GaugeMetricFamily("kvtier_waiting_requests", "Requests queued for the MLX thread.",
                                value=self.state.worker.waiting)
        yield from _batch_metrics(self.state.worker.describe())


def _batch_metrics(batch: dict) -> Iterator[Metric]:
    """The worker's batching: what runs now, and totals since start-up."""
    yield GaugeMetricFamily("kvtier_batch_enabled", "1 when requests are decoded in one batch.",
                            value=int(batch["enabled"]))
    yield GaugeMetricFamily("kvtier_batch_size", "Requests in the running batch (prefilling or decoding).",
                            value=batch["running"])
    yield GaugeMetricFamily("kvtier_batch_max", "Most requests served at once (--max-batch).",
                            value=batch["max_batch"])
    yield CounterMetricFamily("kvtier_queue_wait_seconds", "Seconds requests spent queued before they started.",
                              value=batch["queue_wait_seconds_total"])
    yield CounterMetricFamily("kvtier_admitted_requests", "Requests taken off the queue.",
                              value=batch["admitted_requests"])
    for phase in ("prefill", "decode"):
        doing = phase[:-1] + "ing"
        yield CounterMetricFamily(f"kvtier_{phase}_tokens", f"Tokens computed while {doing}.",
                                  value=batch[f"{phase}_tokens"])
        yield CounterMetricFamily(f"kvtier_{phase}_seconds", f"Seconds spent {doing}.",
                                  value=batch[f"{phase}_seconds"])
        yield GaugeMetricFamily(f"kvtier_{phase}_tokens_per_second",
                                f"{phase.capitalize()} tokens per second since start-up.",
                                value=batch[f"{phase}_tokens_per_second"] or 0)


routes = web.RouteTableDef()


@routes.get("/metrics")
async def metrics(http: web.Request) -> web.Response:
    http.app[STATE].engine()  # a 503 while the model loads
    return web.Response(body=generate_latest(http.app[_REGISTRY]),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


def setup(app: web.Application) -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(app[STATE]))
    app[_REGISTRY] = registry
    app.add_routes(routes)
