"""The aiohttp application factory: one worker thread for MLX, routes, error handling."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from pathlib import Path
from typing import AsyncIterator, Callable

from aiohttp import web

from kvtier.chunking import PrefillChunk
from kvtier.config import ModelSpec, ServeConfig
from kvtier.engine import Engine
from kvtier.hub import fetch_model

from . import metrics, openapi
from .auth import auth_middleware
from .disconnects import disconnect_middleware
from .errors import error_middleware
from .guard import Guard, cors_headers, guard_middleware
from .prefill_fits import measure_unremembered
from .pressure import PressureWatcher
from .read_timeout import READ_TIMEOUT
from .routes import anthropic as anthropic_routes
from .routes import cache as cache_routes
from .routes import models as models_routes
from .routes import openai as openai_routes
from .routes import responses as responses_routes
from .routes import status as status_routes
from .server import SHUTDOWN
from .state import STATE, DaemonState
from .worker import Worker
from .write_retry import write_retry

log = logging.getLogger("kvtier.daemon")

MAX_BODY_BYTES = 32 * 2**20


def init_app(config: ServeConfig) -> web.Application:
    # The guard first: a request from a web page is refused before auth and before any work.
    guard = Guard.of(config)
    middlewares = [guard_middleware(guard), disconnect_middleware, error_middleware]
    if config.api_key:
        middlewares.append(auth_middleware(config.api_key))
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app.on_response_prepare.append(cors_headers(guard))
    app[READ_TIMEOUT] = config.read_timeout

    def load(spec: ModelSpec, prefill: PrefillChunk | None, progress: Callable[[str], None],
             earlier: Engine | None) -> Engine:
        """A model's engine: its own KV options over the daemon's; a reload keeps the prefill
        chunk timed at its first load, and the tokenizer and cache plan of `earlier` (Engine)."""
        cache = replace(config.cache, kv_bits=spec.kv_bits or config.cache.kv_bits,
                        kv_group_size=spec.kv_group_size or config.cache.kv_group_size)
        if not Path(spec.source).is_dir():  # a repo id: --allow-any-model's are fetched on first use
            fetch_model(spec.source, offline=config.offline)
        # The index records the names it was served by: `kvtier purge --model NAME` finds it by them.
        engine = Engine(spec.source, cache, prefill or config.prefill_step_size, progress=progress, earlier=earlier,
                        names={"name": spec.name, "source": spec.source, "aliases": spec.aliases})
        log.info("model %s loaded; cache at %s", spec.name, config.cache.cache_dir)
        return engine

    prefetch = config.prefetch if config.prefetch is not None else config.cache.ram_budget // 2
    app[SHUTDOWN] = asyncio.Event()
    app[STATE] = DaemonState(config, Worker(load, config.models, config.max_waiting, config.max_batch,
                                            config.exact, prefetch, config.memory_budget, config.keep_alive,
                                            before_loads=lambda: measure_unremembered(config)))
    app.cleanup_ctx.append(_worker_lifetime)
    app.add_routes(openai_routes.routes)
    app.add_routes(cache_routes.routes)
    app.add_routes(models_routes.routes)
    app.add_routes(openapi.routes)
    app.add_routes(anthropic_routes.routes)
    responses_routes.setup(app)
    metrics.setup(app)
    status_routes.setup(app)
    return app


async def _worker_lifetime(app: web.Application) -> AsyncIterator[None]:
    """Load the model in the background; on shutdown flush every block to disk.

    Shutdown waits for each thread to end: the watcher and the write retry first (they queue
    work for the MLX thread), then the MLX thread, which writes every queued block and frees its MLX state.
    """
    state = app[STATE]
    state.worker.start()
    watcher = PressureWatcher(state.worker, state.config.pressure_below, state.config.pressure_keep)
    watcher.start()
    load_watch = asyncio.create_task(_stop_if_the_model_fails_to_load(app))
    retry = write_retry(state.worker)
    retry.start()
    yield
    load_watch.cancel()
    log.info("shutting down: flushing cached blocks to disk")
    watcher.stop()
    retry.stop()
    await asyncio.to_thread(state.worker.stop)
    log.info("shutdown complete")


async def _stop_if_the_model_fails_to_load(app: web.Application) -> None:
    """A daemon whose model cannot load would answer 503 forever: it stops instead, so that
    `kvtier serve` exits non-zero and a service manager restarts it or reports it."""
    worker = app[STATE].worker
    await asyncio.to_thread(worker.ready.wait)
    if worker.load_error is not None:
        app[SHUTDOWN].set()
