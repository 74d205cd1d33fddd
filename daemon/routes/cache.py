"""Health and cache inspection routes."""

from __future__ import annotations

from aiohttp import web

from ..state import STATE

routes = web.RouteTableDef()


@routes.get("/health")
async def health(http: web.Request) -> web.Response:
    state = http.app[STATE]
    worker = state.worker
    if worker.engine is None:
        status = "error" if worker.load_error else "loading"
        return web.json_response({"status": status, "error": worker.load_error}, status=503)
    store = worker.engine.store
    return web.json_response({
        "status": "ok", "model": state.model_id(), "waiting_requests": worker.waiting,
        "disk_writable": store.disk_error is None, "disk_error": store.disk_error})


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
        "tokens": {"from_ram": counters.get("tokens_from_ram", 0),
                   "from_disk": counters.get("tokens_from_disk", 0),
                   "computed": counters.get("tokens_computed", 0)},
    })
    return web.json_response(stats)
