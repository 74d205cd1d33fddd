"""Health, cache inspection and management routes (/metrics: daemon/metrics.py)."""

from __future__ import annotations

import asyncio
from typing import cast

from aiohttp import web

from kvtier import ops, scheduler
from kvtier.config import parse_duration, parse_size
from kvtier.local import LocalDisk
from kvtier.tiers import TieredStore

from ..auth import is_loopback
from ..bodies import read_body
from ..bodies_cache import PinRequest, WarmRequest
from ..errors import ApiError
from ..models import FAILED
from ..state import STATE, DaemonState
from ..worker import Worker
from . import model_stats
from .models import batching, describe, served_named
from .openai import template_messages

routes = web.RouteTableDef()


@routes.get("/health")
async def health(http: web.Request) -> web.Response:
    """The default model's health at the top level (as with one model), every model's under
    `models`. "ok" once the default model has loaded: another model unloaded or failed, or the
    default unloaded for room (a request loads it again), is no fault of the daemon's."""
    state = http.app[STATE]
    worker, default = state.worker, state.worker.default
    models = {m.name: describe(worker, m) for m in list(worker.models.values())}
    if default.engine is None or default.state == FAILED:
        status = "error" if default.load_error else "loading"
        return web.json_response({"status": status, "error": default.load_error, "models": models}, status=503)
    engine = default.engine
    # A read-only disk or an unreachable shared store degrades nothing: still "ok".
    return web.json_response({"status": "ok", "model": default.name, "model_state": default.state,
                              "waiting_requests": worker.waiting, **_tiers_health(worker),
                              "batching": batching(worker, default),
                              "prefill_chunk": engine.prefill_chunk.describe(), "access": _access(state.config),
                              "models": models})


def _tiers_health(worker: Worker) -> dict:
    """Whether the disk takes writes, the shared store's connection: from the default model's
    store, or with it unloaded another loaded model's (the cache directory is theirs too)."""
    for model in model_stats.open_models(worker):
        try:
            return model.engine.store.health() if model.engine is not None else {}
        except Exception:  # its store closed under us (an unload): the next one's
            continue
    return {}


def _access(config) -> dict:
    """Who can reach the daemon (docs/security.md); a bind beyond loopback needs --api-key."""
    return {"loopback_only": is_loopback(config.host), "api_key": bool(config.api_key),
            "allowed_hosts": config.allowed_hosts, "allowed_origins": config.allowed_origins}


@routes.get("/cache/stats")
async def cache_stats(http: web.Request) -> web.Response:
    """The default model's cache, or `?model=NAME`'s (an exact name: 404 for another). A model
    that is not loaded is not loaded for this: its state, and what the disk holds of it."""
    state = http.app[STATE]
    model = served_named(state, http.query["model"]) if "model" in http.query else state.worker.default
    if not model.loaded:
        if model is state.worker.default and model.engine is None:
            state.engine()  # a 503 while it loads at start-up, as before
        return web.json_response(model_stats.unloaded(state.worker, model))
    try:
        return web.json_response(model_stats.loaded(state.worker, model))
    except Exception:
        if model.loaded:
            raise
        return web.json_response(model_stats.unloaded(state.worker, model))  # unloaded as it was read


def _cache_dir(http: web.Request) -> LocalDisk:
    return _open_stores(http.app[STATE])[0].disk  # the CLI's operations, on the daemon's own disk tier


def _open_stores(state: DaemonState) -> list[TieredStore]:
    """The loaded models' stores, the default model's first (the cache directory is every
    model's); a 503 when none is loaded."""
    stores = [m.engine.store for m in model_stats.open_models(state.worker) if m.engine is not None]
    if not stores:
        state.engine()  # a 503 while the default model loads at start-up, as before
        raise ApiError(503, "no model is loaded to read the cache directory with: load one "
                            "(kvtier models load NAME)", type_="server_error", code="model_not_ready",
                       headers={"Retry-After": "5"})
    return stores


async def _writes_landed(state: DaemonState, stores: list[TieredStore]) -> None:
    """Wait (10 s at most each) for the disk writes the loaded models' stores have queued, and
    for those unloaded models' stores are still finishing."""
    for store in stores:
        await asyncio.to_thread(store.wait_for_writes, 10.0)
    await asyncio.to_thread(state.worker.loader.wait_for_writes, 10.0)


@routes.get("/cache/entries")
async def cache_entries(http: web.Request) -> web.Response:
    """Cached prefixes, as `kvtier ls --json` lists them, with the tier they are in now;
    `limit` and `offset` page through them (default: all). The start of each prompt's text
    (`preview`) only with --show-previews: it is what the user's agents sent."""
    limit, offset = _natural(http.query, "limit"), _natural(http.query, "offset") or 0
    state = http.app[STATE]
    stores = _open_stores(state)
    show = state.config.show_previews
    await _writes_landed(state, stores)  # list what is being written too
    found = await asyncio.to_thread(ops.prefixes, _cache_dir(http), preview_tokens=12 if show else 0,
                                    limit=limit, offset=offset)
    entries = []
    for prefix in found:
        hot = sum(1 for key in prefix.chain if any(store.is_hot(key) for store in stores))
        tier = "ram+disk" if hot == len(prefix.chain) else ("partly ram" if hot else "disk")
        entry = dict(prefix.to_json(), tier=tier)
        if not show:
            del entry["preview"]
        entries.append(entry)
    return web.json_response({"object": "list", "data": entries})


def _natural(query, name: str) -> int | None:
    if name not in query:
        return None
    try:
        value = int(query[name])
    except ValueError:
        value = -1
    if value < 0:
        raise ApiError(400, f"{name} must be a whole number >= 0, got {query[name]!r}", param=name)
    return value


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
    if model in state.model_ids():  # an alias or "default": the loaded model, by its fingerprint
        model = state.engine().fingerprint
    await _writes_landed(state, _open_stores(state))  # purged too, not left to land after
    try:
        result = await asyncio.to_thread(ops.purge, _cache_dir(http), everything=everything,
                                         model=model, older_than_s=older, to_size=to_size)
    except ops.UnknownModel as exc:
        raise ApiError(400, str(exc), param="model") from None
    every_entry = everything and model is None and older is None  # else `all` only adds the pinned ones
    for served in model_stats.open_models(state.worker):
        if served.engine is not None and (every_entry or served.engine.fingerprint in result["models"]):
            served.engine.store.forget_hot()  # the hot copies of what was purged go too
    return web.json_response(result)


@routes.post("/cache/pin")
@routes.post("/cache/unpin")
async def pin(http: web.Request) -> web.Response:
    """`kvtier pin | unpin KEY` on the daemon's cache: protect a prefix from eviction or not."""
    body = await read_body(http, PinRequest)
    pinned = http.path == "/cache/pin"
    changed = await asyncio.to_thread(ops.set_pinned, _cache_dir(http), body.key, pinned)
    if not changed:
        raise ApiError(404, f"no cached prefix starts with {body.key!r} (see /cache/entries)",
                       param="key", code="prefix_not_found")
    return web.json_response({"entries": changed, "pinned": pinned})


def warm_conversation(body: WarmRequest) -> tuple[list[dict], list[dict] | None]:
    """What a warm request prefills: its messages as the chat routes template them (its
    prompt as the system message), and its tools; `kvtier warm` reads a file through it too,
    so a warmed prompt is the one a request with the same messages renders and reuses."""
    if body.messages is not None:
        messages = template_messages(body.messages)
    elif body.prompt is not None:
        messages = [{"role": "system", "content": body.prompt}]
    else:
        raise ApiError(400, "missing required parameter: 'prompt' (or give 'messages')", param="prompt")
    return messages, cast("list[dict] | None", body.tools or None)  # bodies.Sent: the dicts as sent


@routes.post("/cache/warm")
async def warm(http: web.Request) -> web.Response:
    """Prefill {messages, tools} (or {prompt}: a system prompt) and persist it; pin on request.
    `model` selects (and loads) the model as a chat request's does; absent: the default model."""
    body = await read_body(http, WarmRequest)
    state = http.app[STATE]
    messages, tools = warm_conversation(body)
    await state.select_model(body.model if body.model is not None else "default")
    # The scheduler's path, a scheduler of one on the MLX thread between the worker's steps.
    result = await state.worker.call(lambda engine: scheduler.warm(engine, messages, tools, pin=body.pin),
                                     state.selected().name)
    return web.json_response(result)
