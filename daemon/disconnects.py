"""A client that goes away before its answer is complete (Claude Code drops its title request
on exit, `curl | head` closes the pipe) is routine: one INFO line and a counter, never a
traceback or a 500 in the access log. Stopping its generation is the
handler's `finally`'s job (the worker's job is cancelled when its reader stops)."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from .state import STATE

log = logging.getLogger("kvtier.daemon")


def note_client_gone(http: web.Request) -> None:
    log.info("client went away during %s %s; generation stopped", http.method, http.path)
    engine = http.app[STATE].selected().engine
    if engine is not None:
        engine.store.count("client_disconnects")


def client_gone(http: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """A stream's write met a closed connection: note it; return the response already
    started, for the access log."""
    note_client_gone(http)
    return response


def _connection_lost(http: web.Request) -> bool:
    transport = http.transport
    return transport is None or transport.is_closing()


@web.middleware
async def disconnect_middleware(request: web.Request, handler):  # aiohttp's parameter names
    """aiohttp cancels the handler of a client that disconnects (`handler_cancellation`,
    daemon/server.py), often before a write could fail: that is a client gone too."""
    try:
        return await handler(request)
    except asyncio.CancelledError:
        if _connection_lost(request):
            note_client_gone(request)
        raise
