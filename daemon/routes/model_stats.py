"""`GET /cache/stats` for one model: a loaded model's tiers and counters since it loaded, or,
for a model that is not loaded (it is not loaded to report on it), its state and what the
cache directory holds of it, read from the index through a loaded model's store."""

from __future__ import annotations

import logging

from kvtier import ops
from kvtier.engine import Engine
from kvtier.index_totals import MODEL_TOTAL_FIELDS

from ..models import ServedModel
from ..worker import Worker

log = logging.getLogger("kvtier.stats")


def loaded(worker: Worker, model: ServedModel) -> dict:
    engine = model.engine
    assert engine is not None
    stats = engine.store.stats()
    counters = stats["counters"]
    stats.update({
        "model": model.name,
        "state": model.state,
        "fingerprint": engine.fingerprint,
        "prefix_reuse": engine.reusable,
        "hits": counters.get("requests_hit", 0),
        "misses": counters.get("requests_miss", 0),
        "half_cached": counters.get("requests_half_cached", 0),
        "hit_rate": ops.rates(counters)["hit_rate"],  # weighted by tokens
        "tokens": {"from_ram": counters.get("tokens_from_ram", 0),
                   "from_disk": counters.get("tokens_from_disk", 0),
                   "from_shared": counters.get("tokens_from_shared", 0),
                   "from_live": counters.get("tokens_from_live", 0),  # of from_ram: no copy
                   "computed": counters.get("tokens_computed", 0)},
        "batch": worker.describe(model),
        "tokenizer": engine.renderer.stats(),
        "on_disk": on_disk(worker, engine.fingerprint),
    })
    return stats


def unloaded(worker: Worker, model: ServedModel) -> dict:
    """Its state and sizes; with its fingerprint known (it was loaded before), the entries the
    disk tier holds of it and its request counters as the index keeps them (all time)."""
    fingerprint = model.engine.fingerprint if model.engine is not None else None
    return {"model": model.name, "state": model.state, "error": model.load_error,
            "weight_bytes": model.weight_bytes, "hot_bytes": 0, "loads": model.loads,
            "fingerprint": fingerprint, "batch": worker.describe(model),
            "on_disk": on_disk(worker, fingerprint) if fingerprint else None}


def on_disk(worker: Worker, fingerprint: str) -> dict | None:
    """A model's entries on disk (blocks, snapshots, bytes, pinned bytes) and its persisted
    request counters, from the index every model's store shares; None with no store open."""
    engine = _open_engine(worker)
    if engine is None:
        return None
    try:
        index = engine.store.index
        totals = index.model_totals().get(fingerprint) or dict.fromkeys(MODEL_TOTAL_FIELDS, 0)
        return dict(totals, **ops.rates(index.counters().get(fingerprint, {})))
    except Exception as exc:  # that store was being closed (its model unloading): no totals this time
        log.debug("no disk totals for %s: %s", fingerprint, exc)
        return None


def _open_engine(worker: Worker) -> Engine | None:
    loaded = open_models(worker)
    return loaded[0].engine if loaded else None


def open_models(worker: Worker) -> list[ServedModel]:
    """The loaded models, the default one first: their stores read the cache directory that
    every model shares."""
    return sorted(worker.loaded_models(), key=lambda m: m is not worker.default)
