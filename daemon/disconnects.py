"""A client that goes away mid-stream (Claude Code drops its title request on exit, `curl |
head` closes the pipe) is routine: one INFO line and a counter, and the access log shows the
status that was sent, not a 500. Stopping its generation is the stream's `finally`'s job."""

from __future__ import annotations

import logging

from aiohttp import web

from .state import STATE

log = logging.getLogger("kvtier.daemon")


def client_left(http: web.Request) -> bool:
    transport = http.transport
    return transport is None or transport.is_closing()


def client_gone(http: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """Note a vanished client; return the response already started, for the access log."""
    log.info("client went away during %s %s; generation stopped", http.method, http.path)
    engine = http.app[STATE].worker.engine
    if engine is not None:
        engine.store.count("client_disconnects")
    return response
