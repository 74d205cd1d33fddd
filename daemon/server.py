"""Serving the app through aiohttp's public API, as `web.run_app` does, with four changes.

- A request aiohttp cannot parse (a URL or a header line over 8190 bytes, bytes that are
  not HTTP) gets the API's JSON error instead of aiohttp's plain text. The parser fails
  before any route or middleware runs, so the one hook is the connection's RequestHandler
  (aiohttp has no setting for it: aio-libs/aiohttp#3287). It is made by a low-level
  `web.Server` of our own around the app's handler, served by a `web.ServerRunner`; an
  AppRunner keeps running the app's startup, shutdown and cleanup.
- Such a request, and a body whose framing or encoding breaks later, is logged as one INFO
  line, not aiohttp's ERROR traceback (daemon/malformed.py, a filter on aiohttp's logger).
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
from .malformed import quiet_malformed_requests
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


class ApiServer(web.Server):
    """aiohttp's low-level Server (the protocol factory), making ApiRequestHandlers."""

    def __init__(self, handler: Any, *, request_factory: Any, **options: Any):
        super().__init__(handler, request_factory=request_factory, handler_cancellation=True, **options)
        self.options = options  # the connections' settings, as web.Server hands them on

    def __call__(self) -> web.RequestHandler:
        return ApiRequestHandler(self, loop=asyncio.get_running_loop(), **self.options)


class Serving:
    """The app's lifetime (an AppRunner: its startup, shutdown and cleanup) and its
    connections (a ServerRunner on an ApiServer around the app's handler)."""

    def __init__(self, app: web.Application, handle_signals: bool = False):
        self.app_runner = web.AppRunner(app)
        self.handle_signals = handle_signals
        self.runner: web.ServerRunner | None = None

    async def setup(self) -> web.ServerRunner:
        runner = await self.make_runner()
        await runner.setup()
        return runner

    async def make_runner(self) -> web.ServerRunner:
        """The app started, and a runner (not yet set up) for its connections."""
        quiet_malformed_requests()
        await self.app_runner.setup()  # the app's startup has run; its handler is made
        app_server = self.app_runner.server
        assert app_server is not None
        seconds = read_timeout(self.app_runner.app)
        # lingering_time: after an answer sent before its body arrived (a 408), aiohttp reads
        # on for the rest; a client that never sends it held the socket 10 s past the timeout.
        server = ApiServer(app_server.request_handler, request_factory=app_server.request_factory,
                           keepalive_timeout=seconds, lingering_time=min(seconds, 10.0))
        self.runner = web.ServerRunner(server, handle_signals=self.handle_signals)
        return self.runner

    async def cleanup(self) -> None:
        """Stop listening, let running requests finish, then the app's shutdown and cleanup."""
        try:
            if self.runner is not None:
                await self.runner.cleanup()
        finally:
            await self.app_runner.cleanup()


async def _serve(app: web.Application, sockets: list[socket.socket]) -> None:
    serving = Serving(app, handle_signals=True)
    try:
        runner = await serving.setup()
        for sock in sockets:  # bound and listening since start-up (daemon/listen.py)
            await web.SockSite(runner, sock).start()
            log.info("listening on http://%s:%s", *sock.getsockname()[:2])
        await app[SHUTDOWN].wait()
    finally:
        await serving.cleanup()


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
