"""What the chat routes share: a prompt rendered to tokens (kvtier.prompt, on a thread), the
engine's chunks through the MLX worker, and an answer read as text then tool calls."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncGenerator

from kvtier.engine import Chunk, GenerationRequest, Usage

from ..errors import ApiError
from ..state import DaemonState
from ..worker import Overloaded
from .tools import ToolCall, ToolCallBuffer


@dataclass
class Prompt:
    messages: list[dict]     # chat-template messages, without a trailing prefill
    tools: list[dict] | None  # tools in the OpenAI/HF function shape
    prefill: str              # a final assistant text the answer continues ("" if none)
    parse_tools: bool         # whether to read tool calls out of the answer


async def render(state: DaemonState, prompt: Prompt) -> tuple[list[int], list[int]]:
    """The prompt's tokens and message ends (snapshot points), off the event loop."""
    renderer = state.engine().renderer
    return await asyncio.to_thread(renderer.render, prompt.messages, prompt.tools, prompt.prefill)


async def chunks_of(state: DaemonState, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
    engine = state.engine()
    if (token := engine.beyond_vocabulary(request.prompt_tokens)) is not None:
        raise ApiError(400, f"the prompt holds token id {token}, which this model has no embedding for "
                            f"(its vocabulary is {engine.vocab_size} tokens; the tokenizer has more)",
                       code="invalid_prompt")
    try:
        async for chunk in state.worker.generate(request):
            yield chunk
    except Overloaded:
        raise ApiError(503, "too many requests are waiting; retry shortly", type_="server_error",
                       code="overloaded", headers={"Retry-After": "2"}) from None


class Generation:
    """One request's answer as text pieces, then tool calls, finish reason and usage."""

    def __init__(self, state: DaemonState, request: GenerationRequest, prompt: Prompt):
        engine = state.engine()
        self.state, self.request = state, request
        self.buffer = ToolCallBuffer(engine.tokenizer, prompt.tools, enabled=prompt.parse_tools)
        self.stop_sequence: str | None = None
        self.finish: str | None = None
        self.calls: list[ToolCall] = []
        self.usage: Usage | None = None

    async def texts(self) -> AsyncGenerator[str, None]:
        """Text to show, piece by piece ("" pieces included: the first one says generation
        has started). Tool calls are held back and parsed at the end."""
        chunks = chunks_of(self.state, self.request)
        try:
            async for chunk in chunks:
                if chunk.finish_reason:  # the engine matched stop sequences itself
                    self.finish, self.usage = chunk.finish_reason, chunk.usage
                    self.stop_sequence = chunk.stop_sequence
                yield self.buffer.feed(chunk.text)
        finally:
            await chunks.aclose()
        tail, self.calls = self.buffer.finish()
        yield tail
