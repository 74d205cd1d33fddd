"""Optional API key: when set, every route needs `Authorization: Bearer KEY` (OpenAI
clients) or `x-api-key: KEY` (Anthropic clients)."""

from __future__ import annotations

import hmac
import ipaddress
import socket

from aiohttp import web

from .errors import ApiError

PAGE_PATHS = frozenset({"/", "/static/status.js", "/static/status.css"})  # daemon/routes/status.py


def presented_key(request: web.Request) -> bytes:
    """The key as the client sent it, byte for byte: aiohttp decodes header values as UTF-8
    with surrogateescape, so any bytes at all (not only UTF-8) come back unchanged."""
    auth = request.headers.get("Authorization", "")
    key = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
    return key.encode("utf-8", "surrogateescape")


def auth_middleware(api_key: str):
    expected = api_key.encode()

    @web.middleware
    async def check(request: web.Request, handler):
        # The status page's own files hold no data: the page asks for the key, then sends it.
        page_file = request.method == "GET" and request.path in PAGE_PATHS
        if not page_file and not hmac.compare_digest(presented_key(request), expected):
            # Raised, not returned: the error middleware answers in the route's API shape.
            raise ApiError(401, "missing or wrong API key", type_="authentication_error",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return check


def is_loopback(host: str) -> bool:
    """True when `host` only ever resolves to loopback addresses."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)
