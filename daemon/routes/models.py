"""Operating the models of a daemon: what each one is doing (`GET /models`), and loading,
unloading and pinning one by name (`POST /models/{name}/load|unload|pin|unpin`), as
`kvtier models` does (daemon/cli_models.py). Also what /v1/models, /health, /cache/stats and
/metrics say per model (`describe`, `served_named`)."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from kvtier.models_memory import weights_on_disk

from ..errors import ApiError
from ..models import LOADING, ServedModel
from ..state import STATE, DaemonState, model_error
from ..worker import ModelBusy, Overloaded, Worker

routes = web.RouteTableDef()

# The fields of `Worker.describe` that /health and /models show per model as `batching`.
BATCHING_FIELDS = ("mode", "enabled", "exact", "max_batch", "reason", "max_logprob_difference", "batched_prefill",
                   "running")


def served_named(state: DaemonState, name: str) -> ServedModel:
    """The model an exact name means (its name, an alias, its source, its directory name,
    "default"): an operator's command never falls back to the default model, never loads an
    unconfigured one. 404 `model_not_found` otherwise."""
    spec = state.names.spec_named(name)
    if spec is None:
        served = ", ".join(f"'{m}'" for m in state.worker.models)
        raise ApiError(404, f"no model '{name}' is configured; this daemon serves {served}",
                       param="model", code="model_not_found")
    return state.worker.add_model(spec)


def batching(worker: Worker, model: ServedModel) -> dict:
    info = worker.describe(model)
    return {key: info[key] for key in BATCHING_FIELDS}


def describe(worker: Worker, model: ServedModel) -> dict:
    """A model's state, sizes and load history, and how its requests run."""
    return dict(model.describe(), weight_bytes=weight_bytes(model), default=model is worker.default,
                batching=batching(worker, model))


def weight_bytes(model: ServedModel) -> int:
    """Its weights' bytes: as loaded, else its safetensors files' size where its source is a
    local directory (0 for a repo id not loaded yet: no download to weigh it)."""
    source = Path(model.spec.source).expanduser()
    return model.weight_bytes or (weights_on_disk(source) if source.is_dir() else 0)


@routes.get("/models")
async def list_models(http: web.Request) -> web.Response:
    worker = http.app[STATE].worker
    return web.json_response({"object": "list",
                              "data": [describe(worker, m) for m in list(worker.models.values())]})


@routes.post("/models/{name}/load")
async def load(http: web.Request) -> web.Response:
    state = http.app[STATE]
    model = served_named(state, http.match_info["name"])
    await _load(state, model)
    return web.json_response(describe(state.worker, model))


@routes.post("/models/{name}/unload")
async def unload(http: web.Request) -> web.Response:
    """Unload now: its hot KV is written to disk first. 409 while it serves requests."""
    state = http.app[STATE]
    model = served_named(state, http.match_info["name"])
    if model.state == LOADING:
        raise _busy(model, "is loading")
    try:
        await state.worker.unload(model.name)
    except ModelBusy:
        raise _busy(model, "is serving requests") from None
    except Overloaded:
        raise _overloaded() from None
    return web.json_response(describe(state.worker, model))


@routes.post("/models/{name}/pin")
async def pin(http: web.Request) -> web.Response:
    """Keep the model loaded: loaded now if it is not, never unloaded for room or by the
    keep-alive until unpinned. A load that fails leaves it unpinned."""
    state = http.app[STATE]
    model = served_named(state, http.match_info["name"])
    was = model.spec.pin
    model.spec.pin = True  # one attribute the MLX thread reads when it picks what to unload
    try:
        await _load(state, model)
    except ApiError:
        model.spec.pin = was
        raise
    return web.json_response(describe(state.worker, model))


@routes.post("/models/{name}/unpin")
async def unpin(http: web.Request) -> web.Response:
    """Let the model be unloaded again (for room, or by the keep-alive); it stays loaded now."""
    state = http.app[STATE]
    model = served_named(state, http.match_info["name"])
    model.spec.pin = False
    return web.json_response(describe(state.worker, model))


async def _load(state: DaemonState, model: ServedModel) -> None:
    try:
        await state.worker.load(model.name)
    except Overloaded:
        raise _overloaded() from None
    except Exception as exc:
        raise model_error(model, exc) from None


def _overloaded() -> ApiError:
    return ApiError(503, "too many requests are waiting; retry shortly", type_="server_error",
                    code="overloaded", headers={"Retry-After": "2"})


def _busy(model: ServedModel, doing: str) -> ApiError:
    return ApiError(409, f"model '{model.name}' {doing}: unload it when it is idle", param="model",
                    code="model_busy", headers={"Retry-After": "5"})
