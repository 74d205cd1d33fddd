"""Optional API key: when set, every route needs `Authorization: Bearer KEY` (OpenAI
clients) or `x-api-key: KEY` (Anthropic clients)."""

from __future__ import annotations

import hmac
import ipaddress
import socket

from aiohttp import web

from .errors import ApiError, error_response


def presented_key(request: web.Request) -> str:
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key", "")


def auth_middleware(api_key: str):
    expected = api_key.encode()

    @web.middleware
    async def check(request: web.Request, handler):
        if not hmac.compare_digest(presented_key(request).encode(), expected):
            error = ApiError(401, "missing or wrong API key", type_="authentication_error",
                             code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            if request.path.startswith("/v1/messages"):  # Anthropic clients expect their shape
                return web.json_response({"type": "error", "error": {
                    "type": "authentication_error", "message": error.message}}, status=401)
            return error_response(error)
        return await handler(request)

    return check


def is_loopback(host: str) -> bool:
    """True when `host` only ever resolves to loopback addresses."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)
