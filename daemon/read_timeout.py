"""A bound on the time a client takes to send its request, so that a short body (a
Content-Length it never fills) or a connection that sends nothing cannot hold the daemon's
sockets and memory forever.

The headers and idle keep-alive connections are bounded by aiohttp's keepalive_timeout (its
timer runs from the connection's start and from each answer's end, and closes a connection
whose next request is not complete by then: daemon/server.py sets it); the body by
`read_body`, which answers 408 and closes the connection.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

DEFAULT_READ_TIMEOUT = 60.0
READ_TIMEOUT = web.AppKey("read_timeout", float)


def read_timeout(app: web.Application) -> float:
    return app.get(READ_TIMEOUT, DEFAULT_READ_TIMEOUT)


class BodyTimeout(Exception):
    """The body did not arrive in time: the connection's framing is lost with it."""

    def __init__(self, seconds: float):
        super().__init__(f"the request body did not arrive within {seconds:g} s")


async def read_body(request: web.Request) -> bytes:
    seconds = read_timeout(request.app)
    try:
        return await asyncio.wait_for(request.read(), seconds)
    except asyncio.TimeoutError:
        raise BodyTimeout(seconds) from None
