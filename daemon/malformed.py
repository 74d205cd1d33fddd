"""Requests whose HTTP framing is broken (a bad Content-Length or chunk size, an 8 KB header,
a NUL in a header, a byte over 0x7F in the URL, a body that is not the gzip it says): the
client's fault, answered with a 400 (daemon/server.py). aiohttp logs each with an ERROR
traceback; a hostile or broken client could fill the log with them, so each is one INFO line:
a filter on aiohttp's server logger turns its record into ours.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger("kvtier.daemon")
AIOHTTP_SERVER_LOG = logging.getLogger("aiohttp.server")

_MAX_SHOWN = 300  # characters of aiohttp's message (it may quote a whole 8 KB header)


def is_malformed_request(exc: BaseException) -> bool:
    """A parse error of the request's head or body, as aiohttp raises it."""
    if isinstance(exc, web.RequestPayloadError):
        return True
    return isinstance(exc, HttpProcessingError) and (exc.code or 400) < 500


class MalformedRequestFilter(logging.Filter):
    """Drops aiohttp's traceback of a malformed request, logging our one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if isinstance(record.exc_info, tuple) else record.exc_info
        if not (isinstance(exc, BaseException) and is_malformed_request(exc)):
            return True
        # "Error handling request from %s" names the peer; a body that broke later does not
        peer = record.args[0] if isinstance(record.args, tuple) and record.args else None
        log_malformed(exc, str(peer) if peer else "a client")
        return False


_FILTER = MalformedRequestFilter()


def quiet_malformed_requests() -> None:
    """Install the filter on aiohttp's server logger (once per process)."""
    if _FILTER not in AIOHTTP_SERVER_LOG.filters:
        AIOHTTP_SERVER_LOG.addFilter(_FILTER)


def log_malformed(exc: BaseException, peer: str) -> None:
    log.info("malformed request from %s refused: %s", peer, _one_line(exc))


def _one_line(exc: BaseException) -> str:
    parts: list[str] = []
    cause: BaseException | None = exc
    while cause is not None and len(parts) < 3:  # a payload error wraps the decoder's
        parts.append(getattr(cause, "message", "") or str(cause) or type(cause).__name__)
        cause = cause.__cause__
    text = " ".join(": ".join(parts).split())
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "..."
