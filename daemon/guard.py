"""Keeping web pages out: any page the user's browser opens can send requests to
127.0.0.1, and with DNS rebinding (a name of the attacker's that resolves to 127.0.0.1) read
the answers. Three checks, before auth and before any work (docs/security.md):

- Host: the request must name this daemon (a rebinding page's requests carry its own name).
- Origin: a browser's cross-site request is served only for the daemon's own origin or one
  in --allowed-origins (those get CORS headers and a preflight answer).
- Content-Type: a body must be JSON; a cross-site page can send text/plain, form and
  multipart bodies without a CORS preflight, never application/json.

Requests without Origin (agents, SDKs, curl) pass the origin check unchanged.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from kvtier.config import ServeConfig

from .errors import ApiError, error_response

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARD_ADDRESSES = frozenset({"0.0.0.0", "::", ""})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True)
class Guard:
    hosts: frozenset[str]  # host names (no port) a request's Host may give
    origins: frozenset[str]  # cross-site origins served besides the daemon's own
    any_address: bool  # bound to 0.0.0.0 or ::, so any IP literal naming this machine is its address

    @classmethod
    def of(cls, config: ServeConfig) -> "Guard":
        names = {_name(config.host)} | {_name(host) for host in config.allowed_hosts}
        return cls(LOOPBACK_NAMES | (names - WILDCARD_ADDRESSES),
                   frozenset(origin.rstrip("/").lower() for origin in config.allowed_origins),
                   _name(config.host) in WILDCARD_ADDRESSES)

    def host_allowed(self, host: str) -> bool:
        # An IP literal cannot be rebound: the browser reached the address it names. Bound to
        # 0.0.0.0, every address of this machine is the listening address.
        return host in self.hosts or (self.any_address and _is_ip(host))

    def origin_allowed(self, origin: str, request_host: str) -> bool:
        return origin.rstrip("/").lower() in self.origins or self.own_origin(origin, request_host)

    def own_origin(self, origin: str, request_host: str) -> bool:
        """The daemon's own pages (http://an allowed host, at the port the browser reached)."""
        parts = urlsplit(origin)
        try:
            port = parts.port or 80
        except ValueError:
            return False
        return (parts.scheme == "http" and self.host_allowed(_name(parts.hostname or ""))
                and port == _port(request_host))


def _name(host: str) -> str:
    """A host name as compared: lower case, no brackets, no trailing dot."""
    return host.strip().lower().strip("[]").rstrip(".")


def _split_host(header: str) -> tuple[str, str | None]:
    """"name:port", "[::1]:port" or a name alone -> (name, port or None)."""
    header = header.strip()
    if header.startswith("["):
        name, _, rest = header[1:].partition("]")
        return _name(name), rest[1:] if rest.startswith(":") else None
    name, colon, port = header.rpartition(":")
    return (_name(name), port) if colon and ":" not in name else (_name(header), None)


def _port(host_header: str) -> int | None:
    port = _split_host(host_header)[1]
    if port is None:
        return 80  # http's
    return int(port) if port.isdigit() else None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def is_json(content_type: str) -> bool:
    """application/json or application/*+json, with any parameters (charset)."""
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))


def guard_middleware(guard: Guard):
    @web.middleware
    async def check(request: web.Request, handler):
        try:
            _check(guard, request)
        except ApiError as refused:
            return error_response(request.path, refused)
        if request.method == "OPTIONS" and "Origin" in request.headers \
                and "Access-Control-Request-Method" in request.headers:
            return web.Response(status=204, headers=_preflight_headers(request))
        return await handler(request)

    return check


def _check(guard: Guard, request: web.Request) -> None:
    """Raises the refusal of a request a web page may have sent."""
    # The port is not compared: a rebinding page reaches the daemon's own port, so only the
    # name tells it apart, and a tunnel (ssh -L 9000:127.0.0.1:8420) changes the port.
    # A request without Host (HTTP/1.0) comes from no browser.
    host = request.headers.get("Host")
    if host is not None and not guard.host_allowed(_split_host(host)[0]):
        raise ApiError(403, f"Host {host!r} is not this daemon's address; give the name with "
                            "--allowed-hosts to serve it", type_="permission_error", code="host_not_allowed")
    origin = request.headers.get("Origin")
    if origin is not None and not guard.origin_allowed(origin, host or ""):
        raise ApiError(403, f"requests from the web page at {origin!r} are refused; list the origin "
                            "with --allowed-origins to serve it", type_="permission_error",
                       code="origin_not_allowed")
    if request.method in BODY_METHODS and request.body_exists and \
            not is_json(request.headers.get("Content-Type", "")):
        given = request.headers.get("Content-Type")
        got = f"; got {given!r}" if given else ""
        raise ApiError(415, f"send the body as JSON with the header Content-Type: application/json{got}",
                       param="Content-Type", code="unsupported_media_type")


def _preflight_headers(request: web.Request) -> dict[str, str]:
    headers = {"Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
               "Access-Control-Max-Age": "600"}
    asked = request.headers.get("Access-Control-Request-Headers")
    if asked:  # the origin is trusted: any header it wants to send (Authorization, x-api-key)
        headers["Access-Control-Allow-Headers"] = asked
    if request.headers.get("Access-Control-Request-Private-Network") == "true":
        headers["Access-Control-Allow-Private-Network"] = "true"  # Chrome's Private Network Access
    return headers


def cors_headers(guard: Guard):
    """An on_response_prepare hook: every answer to an accepted Origin (streams included, and
    its errors, which the page may then read) carries CORS headers."""
    async def add(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin is not None and guard.origin_allowed(origin, request.headers.get("Host", "")):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = "Retry-After"
            response.headers.add("Vary", "Origin")

    return add
