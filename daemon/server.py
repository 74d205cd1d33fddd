"""Serving the app: aiohttp's AppRunner, as `web.run_app` uses it, with two changes.

- A request aiohttp cannot parse (a URL or a header line over 8190 bytes, bytes that are
  not HTTP) gets the API's JSON error instead of aiohttp's plain text. The parser fails
  before any route or middleware runs, so the one hook is the connection's RequestHandler
  (aiohttp has no setting for it: aio-libs/aiohttp#3287).
- Such a request, and a body whose framing or encoding breaks later, is logged as one INFO
  line, not aiohttp's ERROR traceback (daemon/malformed.py).
- A handler whose client disconnects is cancelled (`handler_cancellation`), so a
  non-streamed completion stops generating, as a stream does when its write fails.
- A connection whose next request's headers are not in within the read timeout (an idle
  keep-alive one too) is closed: aiohttp's keepalive_timeout (daemon/read_timeout.py).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from contextlib import suppress
from typing import Any

from aiohttp import web

from .errors import INTERNAL_ERROR, unrouted_error_body
from .malformed import is_malformed_request, log_malformed
from .read_timeout import read_timeout

log = logging.getLogger("kvtier.daemon")

# Set by the app to stop serving without a signal (its model failed to load).
SHUTDOWN = web.AppKey("shutdown", asyncio.Event)


class ApiRequestHandler(web.RequestHandler):
    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None, message: str | None = None) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; refuses once a response started
        if status >= 500 or not message:
            message = INTERNAL_ERROR if status >= 500 else "bad request"
        response = web.json_response(unrouted_error_body(status, message), status=status)
        response.force_close()  # as aiohttp does: the connection's framing may be lost
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        # aiohttp's one logging hook for parse errors: from handle_error, and from reading
        # past a body whose chunking or encoding broke after the handler answered
        exc = kw.get("exc_info")
        if not (isinstance(exc, BaseException) and is_malformed_request(exc)):
            super().log_exception(*args, **kw)
            return
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        log_malformed(exc, peer[0] if peer else "a client")


class ApiServer(web.Server):
    """aiohttp's Server (the protocol factory), making ApiRequestHandlers."""

    def __call__(self) -> web.RequestHandler:
        return ApiRequestHandler(self, loop=self._loop, **self._kwargs)


class ApiRunner(web.AppRunner):
    def __init__(self, app: web.Application, **kwargs: Any):
        kwargs.setdefault("keepalive_timeout", read_timeout(app))
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        # The app's own Server (its startup has run), rebuilt as an ApiServer with the same
        # handler, request factory and connection settings; it has no connection yet.
        server = await super()._make_server()
        return ApiServer(server.request_handler, request_factory=server.request_factory,
                         handler_cancellation=server.handler_cancellation, loop=server._loop,
                         **server._kwargs)


async def _serve(app: web.Application, sockets: list[socket.socket]) -> None:
    runner = ApiRunner(app, handle_signals=True, handler_cancellation=True)
    await runner.setup()
    try:
        for sock in sockets:  # bound and listening since start-up (daemon/listen.py)
            await web.SockSite(runner, sock).start()
            log.info("listening on http://%s:%s", *sock.getsockname()[:2])
        await app[SHUTDOWN].wait()
    finally:
        await runner.cleanup()  # lets running requests finish, then the app's cleanup


def run(app: web.Application, sockets: list[socket.socket]) -> None:
    """Serve on `sockets` until SIGTERM or SIGINT (or the app sets SHUTDOWN), shutting down
    the way `web.run_app` does."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    main = loop.create_task(_serve(app, sockets))
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        if not main.done():
            main.cancel()
            with suppress(asyncio.CancelledError):
                loop.run_until_complete(main)
        rest = asyncio.all_tasks(loop)
        for task in rest:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
