"""Server-sent events, for the OpenAI, Anthropic and Responses streams: the framing, and the
life of a streamed answer (first piece before the headers, a vanished client, cancelling)."""

from __future__ import annotations

import json
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, Callable, TypeVar

from aiohttp import web

from .disconnects import client_gone

T = TypeVar("T")
Send = Callable[..., Awaitable[None]]  # send(data, event=None)


def frame(data: dict | str, event: str | None = None) -> bytes:
    """One event: an optional `event:` line and one `data:` line (JSON, or text as is)."""
    text = data if isinstance(data, str) else json.dumps(data)
    return (f"event: {event}\n" if event else "").encode() + f"data: {text}\n\n".encode()


async def stream(http: web.Request, pieces: AsyncGenerator[T, None],
                 events: Callable[[Send, T, AsyncIterator[T]], Awaitable[Any]]) -> web.StreamResponse:
    """Answer with `events(send, first, pieces)`. The first piece is awaited before the headers
    go out, so errors such as an overloaded queue still get a proper status code; a client
    that goes away is noted, and closing `pieces` cancels its generation."""
    try:
        first = await anext(pieces)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(http)

        async def send(data: dict | str, event: str | None = None) -> None:
            await response.write(frame(data, event))

        try:
            await events(send, first, pieces)
            await response.write_eof()
        except ConnectionResetError:  # a cancelled handler: disconnects.disconnect_middleware
            return client_gone(http, response)
        return response
    finally:
        await pieces.aclose()  # a vanished client cancels its generation here
