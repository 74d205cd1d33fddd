"""GET /metrics: each model's state, store tiers, counters and batching in Prometheus' text
format, labelled model="NAME" (the cache directory's disk gauges and the daemon's queue carry
no label), read at scrape time by a collector in the app's own registry (several apps may
share a process: tests)."""

from __future__ import annotations

import logging
from typing import Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .models import FAILED, LOADED, LOADING, UNLOADED, ServedModel
from .routes.models import weight_bytes
from .state import STATE, DaemonState
from .worker import Worker

_REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)
log = logging.getLogger("kvtier.metrics")

# (metric, help, tier, field) read from a model's store's stats(), labelled by model
_GAUGES = [
    ("ram_bytes", "Bytes of KV in the hot tier.", "ram", "bytes"),
    ("ram_budget_bytes", "RAM budget.", "ram", "budget"),
    ("ram_pending_bytes", "Bytes in RAM waiting for their disk write (may exceed the budget).",
     "ram", "pending_bytes"),
    ("ram_entries", "Blocks and snapshots in RAM.", "ram", "entries"),
]
# The cache directory's, which every model's store shares: no model label.
_DISK_GAUGES = [
    ("disk_bytes", "Bytes of cache files on disk.", "disk", "bytes"),
    ("disk_budget_bytes", "Disk budget.", "disk", "budget"),
    ("disk_entries", "Blocks and snapshots on disk.", "disk", "entries"),
    ("disk_writable", "1 while the disk tier accepts writes.", "disk", "writable"),
]
# Counters exported with a label besides the model: (metric, help, label, {label value: counter})
_LABELLED = [
    ("requests", "Requests by whether any prefix was reused.", "result",
     {"hit": "requests_hit", "miss": "requests_miss"}),
    ("prompt_tokens", "Prompt tokens by where they came from.", "source",
     {"ram": "tokens_from_ram", "disk": "tokens_from_disk", "shared": "tokens_from_shared",
      "computed": "tokens_computed"}),
]
# Counters always exported (0 until counted); any other counter a store keeps is exported too.
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
MODEL = ["model"]
STATES = (UNLOADED, LOADING, LOADED, FAILED)


class StoreCollector(Collector):
    """Each model's series labelled model="NAME": its state and sizes for every configured
    model, its store's tiers and counters while it is loaded (a store's counters start again
    at each load), its batching always (kept across loads)."""

    def __init__(self, state: DaemonState):
        self.state = state

    def collect(self) -> Iterator[Metric]:
        worker = self.state.worker
        if worker.default.engine is None:
            return  # the default model's first load: /metrics answers 503
        models = list(worker.models.values())
        yield from _model_metrics(models)
        yield from _store_metrics(_loaded_stats(worker))
        yield GaugeMetricFamily("kvtier_waiting_requests", "Requests queued for the MLX thread.",
                                value=worker.waiting)
        yield from _batch_metrics(worker, models)


def _loaded_stats(worker: Worker) -> dict[str, dict]:
    """Each loaded model's store stats; a model unloading as it is read is left out this time."""
    stats = {}
    for model in worker.loaded_models():
        try:
            if model.engine is not None:
                stats[model.name] = model.engine.store.stats()
        except Exception as exc:  # its store closed under us
            log.debug("no stats of %s this scrape: %s", model.name, exc)
    return stats


def _model_metrics(models: list[ServedModel]) -> Iterator[Metric]:
    """What each configured model is doing: loaded or not, its weights and hot KV, its loads."""
    loaded = GaugeMetricFamily("kvtier_model_loaded", "1 while the model is loaded.", labels=MODEL)
    states = GaugeMetricFamily("kvtier_model_state", "1 for the model's state (unloaded, loading, loaded, failed).",
                               labels=["model", "state"])
    weights = GaugeMetricFamily("kvtier_model_weight_bytes", "Bytes of the model's weights.", labels=MODEL)
    hot = GaugeMetricFamily("kvtier_model_hot_bytes", "Bytes of the model's hot KV (RAM tier and live caches).",
                            labels=MODEL)
    loads = CounterMetricFamily("kvtier_model_loads", "Times the model was loaded.", labels=MODEL)
    seconds = GaugeMetricFamily("kvtier_model_load_seconds", "Seconds its last load took.", labels=MODEL)
    for model in models:
        loaded.add_metric([model.name], int(model.loaded))
        for state in STATES:
            states.add_metric([model.name, state], int(model.state == state))
        weights.add_metric([model.name], weight_bytes(model))
        hot.add_metric([model.name], model.hot_bytes())
        loads.add_metric([model.name], model.loads)
        seconds.add_metric([model.name], model.load_seconds or 0)
    yield from (loaded, states, weights, hot, loads, seconds)


def _store_metrics(stats: dict[str, dict]) -> Iterator[Metric]:
    """The loaded models' stores (by model name): tiers and counters, one family per metric."""
    if not stats:
        return
    first = next(iter(stats.values()))
    for name, help_text, tier, key in _DISK_GAUGES:
        yield GaugeMetricFamily(f"kvtier_{name}", help_text, value=float(first[tier][key]))
    for name, help_text, tier, key in _GAUGES:
        yield _per_model(GaugeMetricFamily(f"kvtier_{name}", help_text, labels=MODEL),
                         {model: float(s[tier][key]) for model, s in stats.items()})
    counters = {model: s["counters"] for model, s in stats.items()}
    labelled = set()
    for name, help_text, label, sources in _LABELLED:
        family = CounterMetricFamily(f"kvtier_{name}", help_text, labels=["model", label])
        for value, counter in sources.items():
            for model, kept in counters.items():
                family.add_metric([model, value], kept.get(counter, 0))
            labelled.add(counter)
        yield family
    shared = {model: s["shared"] for model, s in stats.items() if s["shared"] is not None}
    for name, help_text, key in _SHARED_GAUGES if shared else ():
        yield _per_model(GaugeMetricFamily(f"kvtier_{name}", help_text, labels=MODEL),
                         {model: float(s[key]) for model, s in shared.items()})
    known = _COUNTERS | (_SHARED_COUNTERS if shared else {})
    seen = set().union(*counters.values()) - labelled
    for name in dict.fromkeys(known) | dict.fromkeys(sorted(seen)):
        help_text = known.get(name, f"The store's '{name}' counter.")
        yield _per_model(CounterMetricFamily(f"kvtier_{name}", help_text, labels=MODEL),
                         {model: kept.get(name, 0) for model, kept in counters.items()})


def _per_model(family: Metric, values: dict[str, float]) -> Metric:
    for model, value in values.items():
        family.add_metric([model], value)  # type: ignore[attr-defined]
    return family


def _batch_metrics(worker: Worker, models: list[ServedModel]) -> Iterator[Metric]:
    """The worker's batching: what runs now per model, and totals since start-up."""
    batches = {model.name: worker.describe(model) for model in models}
    daemon = worker.describe()
    yield _per_model(GaugeMetricFamily("kvtier_batch_enabled", "1 when requests are decoded in one batch.",
                                       labels=MODEL), {m: int(b["enabled"]) for m, b in batches.items()})
    yield _per_model(GaugeMetricFamily("kvtier_batch_size", "Requests in the running batch (prefilling or decoding).",
                                       labels=MODEL), {m: b["running"] for m, b in batches.items()})
    yield GaugeMetricFamily("kvtier_batch_max", "Most requests served at once (--max-batch).",
                            value=daemon["max_batch"])
    yield CounterMetricFamily("kvtier_queue_wait_seconds", "Seconds requests spent queued before they started.",
                              value=daemon["queue_wait_seconds_total"])
    yield CounterMetricFamily("kvtier_admitted_requests", "Requests taken off the queue.",
                              value=daemon["admitted_requests"])
    for phase in ("prefill", "decode"):
        doing = phase[:-1] + "ing"
        yield _per_model(CounterMetricFamily(f"kvtier_{phase}_tokens", f"Tokens computed while {doing}.",
                                             labels=MODEL), {m: b[f"{phase}_tokens"] for m, b in batches.items()})
        yield _per_model(CounterMetricFamily(f"kvtier_{phase}_seconds", f"Seconds spent {doing}.", labels=MODEL),
                         {m: b[f"{phase}_seconds"] for m, b in batches.items()})
        yield _per_model(GaugeMetricFamily(f"kvtier_{phase}_tokens_per_second",
                                           f"{phase.capitalize()} tokens per second since start-up.", labels=MODEL),
                         {m: b[f"{phase}_tokens_per_second"] or 0 for m, b in batches.items()})


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
