"""The daemon's listening sockets, opened before anything else at start-up: a busy port or
an address this machine does not have is one line and an exit, before the model loads or
the cache directory is touched. The sockets are kept and served as they are, so no other
process can take the address in between."""

from __future__ import annotations

import errno
import socket


class CannotListen(ValueError):
    """The address cannot be bound: in use, not this machine's, or not allowed."""


def open_sockets(host: str, port: int) -> list[socket.socket]:
    """Bound, listening sockets for every address `host` names, as asyncio's create_server
    would open them (SO_REUSEADDR; IPv6 sockets IPv6 only)."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CannotListen(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(128)  # now: a second daemon's bind or listen fails, not this one's later
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise CannotListen(f"cannot listen on {host}:{port}: {_reason(exc)}") from None
    return sockets


def _reason(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "the address is already in use (another kvtier serve?); choose another with --port"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "this machine has no such address (--host)"
    return exc.strerror or str(exc)
