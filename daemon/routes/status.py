"""The status page (GET /: daemon/static/status.html, its script and style) and the one JSON
route it needs beyond /health, /cache/stats and /cache/entries (GET /status): the requests
being served, the measured prefill rate, the time the cache saved, and a series of the
prompt tokens' sources over the last minutes (the loaded models' together), sampled by a
task of the app."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from contextlib import suppress
from importlib import resources
from typing import AsyncIterator

import psutil
from aiohttp import web

from ..auth import PAGE_PATHS
from ..state import STATE, DaemonState

# The page's files, served without the API key: they hold no data (daemon/auth.py).
PAGE_FILES = {"/": ("status.html", "text/html"), "/static/status.js": ("status.js", "text/javascript"),
              "/static/status.css": ("status.css", "text/css")}
SOURCES = ("ram", "disk", "shared", "computed")
log = logging.getLogger("kvtier.status")
SAMPLE_SECONDS = 5.0
SAMPLES_KEPT = 180  # 15 minutes


class Series:
    """The last SAMPLES_KEPT samples, newest last."""

    def __init__(self) -> None:
        self.samples: deque[dict] = deque(maxlen=SAMPLES_KEPT)


_SERIES = web.AppKey("status_series", Series)

routes = web.RouteTableDef()


def _page_file(name: str) -> bytes:
    return resources.files("daemon").joinpath("static").joinpath(name).read_bytes()


async def page(http: web.Request) -> web.Response:
    name, content_type = PAGE_FILES[http.path]
    # no-cache: a daemon upgraded under an open tab serves its new page on reload.
    return web.Response(body=_page_file(name), content_type=content_type, charset="utf-8",
                        headers={"Cache-Control": "no-cache"})


@routes.get("/status")
async def status(http: web.Request) -> web.Response:
    state = http.app[STATE]
    if state.worker.default.engine is None:
        state.engine()  # a 503 while the default model loads at start-up
    counters = _loaded_counters(state)
    batch = state.worker.describe()
    rate = batch["prefill_tokens_per_second"]  # tokens computed / seconds spent prefilling
    tokens = _sources(counters)
    cached = tokens["ram"] + tokens["disk"] + tokens["shared"]
    return web.json_response({
        "uptime_seconds": int(time.time()) - state.started,
        "requests": state.flights.as_json(),
        "waiting": state.worker.waiting,
        "prefill_tokens_per_second": rate,
        "tokens": tokens,
        "seconds_saved": round(cached / rate, 3) if rate else None,
        "sample_seconds": SAMPLE_SECONDS,
        "series": list(http.app[_SERIES].samples),
        "memory": _memory(state),
    })


def _loaded_counters(state: DaemonState) -> dict:
    """The loaded models' store counters, added (a model's start again when it loads again)."""
    total: dict[str, int] = {}
    for model in state.worker.loaded_models():
        try:
            counters = model.engine.store.stats()["counters"] if model.engine is not None else {}
        except Exception as exc:  # unloaded under us (its store closed): left out this time
            log.debug("no counters of %s this time: %s", model.name, exc)
            continue
        for name, value in counters.items():
            total[name] = total.get(name, 0) + value
    return total


def _sources(counters: dict) -> dict:
    return {source: counters.get(f"tokens_from_{source}" if source != "computed" else "tokens_computed", 0)
            for source in SOURCES}


def _memory(state: DaemonState) -> dict:
    """The machine's free memory against --pressure-below, under which the hot tier spills."""
    available = psutil.virtual_memory().available
    below = state.config.pressure_below
    return {"available_bytes": available, "pressure_below_bytes": below,
            "under_pressure": available < below}


async def _sampler(app: web.Application) -> AsyncIterator[None]:
    """Every SAMPLE_SECONDS, the cumulative token counts by source: the page charts their
    differences. A few dict reads: the page may be open or not, this costs the same."""
    series = app[_SERIES]

    async def sample() -> None:
        while True:
            if app[STATE].worker.loaded_models():
                series.samples.append({"time": round(time.time(), 1), **_sources(_loaded_counters(app[STATE]))})
            await asyncio.sleep(SAMPLE_SECONDS)

    task = asyncio.create_task(sample())
    yield
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task


def setup(app: web.Application) -> None:
    assert set(PAGE_FILES) == PAGE_PATHS  # what auth lets through is what is served here
    for path in PAGE_FILES:
        app.router.add_get(path, page)
    app.add_routes(routes)
    app[_SERIES] = Series()
    app.cleanup_ctx.append(_sampler)
