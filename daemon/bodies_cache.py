"""The bodies of the cache routes (/cache/warm, /cache/pin, /cache/unpin) as pydantic models;
a warm request's messages and tools are a chat request's (daemon/bodies_openai.py)."""

from __future__ import annotations

from typing import Annotated, Optional

from pydantic import Field

from .bodies import Body, NonEmpty, Sent
from .bodies_openai import ChatMessage, ChatTool


class WarmRequest(Body):
    """POST /cache/warm: {messages, tools} or {prompt} (a system prompt), for `model` (named as
    a chat request names it; absent: the default model)."""
    model: Optional[str] = None
    messages: Optional[Annotated[list[ChatMessage], Field(min_length=1)]] = None
    prompt: Optional[NonEmpty] = None  # an empty one has nothing to warm
    tools: Optional[list[Sent[ChatTool]]] = None
    pin: bool = False


class PinRequest(Body):
    """POST /cache/pin and /cache/unpin: a prefix key from /cache/entries (a unique start is enough)."""
    key: Annotated[str, Field(min_length=1)]

