"""What the chat routes share: a prompt rendered to tokens (kvtier.prompt, on a thread), the
engine's chunks through the MLX worker, an answer read as text then tool calls, and tokens'
log-probabilities in OpenAI's shape."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncGenerator

from kvtier.prompt_bound import PromptTooLong
from kvtier.requests import Chunk, GenerationRequest, TokenLogprob, Usage

from ..errors import ApiError
from ..flights import decoded
from ..state import DaemonState
from ..worker import Overloaded
from .tools import ToolCall, ToolCallBuffer


@dataclass
class Prompt:
    messages: list[dict]     # chat-template messages, without a trailing prefill
    tools: list[dict] | None  # tools in the OpenAI/HF function shape
    prefill: str              # a final assistant text the answer continues ("" if none)
    parse_tools: bool         # whether to read tool calls out of the answer


@dataclass
class Piece:
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the tokens it shows, if asked


LEAST_LOGPROB = -9999.0  # OpenAI's value for a token of no probability: JSON has no -inf


def _token(raw: bytes, logprob: float) -> dict:
    return {"token": raw.decode(errors="replace"), "logprob": max(logprob, LEAST_LOGPROB), "bytes": list(raw)}


def token_logprobs(entries: list[TokenLogprob]) -> list[dict]:
    """OpenAI's entry per token (chat's `logprobs.content`, the Responses API's `logprobs`)."""
    return [dict(_token(e.token, e.logprob), top_logprobs=[_token(*top) for top in e.top])
            for e in entries]


async def render(state: DaemonState, prompt: Prompt, param: str = "messages") -> tuple[list[int], list[int]]:
    """The prompt's tokens and message ends (snapshot points), off the event loop; one that
    surely cannot fit the context is refused before it is tokenized whole."""
    renderer = state.engine().renderer
    try:
        return await asyncio.to_thread(renderer.render, prompt.messages, prompt.tools, prompt.prefill,
                                       state.context_limit())
    except PromptTooLong as exc:
        raise too_long(exc, param) from None


def too_long(exc: PromptTooLong, param: str) -> ApiError:
    return ApiError(400, f"this model's context is {exc.limit} tokens; the prompt has more than "
                         f"{exc.at_least - 1}", param=param, code="context_length_exceeded")


async def chunks_of(state: DaemonState, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
    engine = state.engine()
    if (token := engine.beyond_vocabulary(request.prompt_tokens)) is not None:
        raise ApiError(400, f"the prompt holds token id {token}, which this model has no embedding for "
                            f"(its vocabulary is {engine.vocab_size} tokens; the tokenizer has more)",
                       code="invalid_prompt")
    try:
        with state.flights.track(request, state.model_id()) as flight:
            async for chunk in state.worker.generate(request, state.selected().name):
                decoded(flight)
                yield chunk
    except Overloaded:
        raise ApiError(503, "too many requests are waiting; retry shortly", type_="server_error",
                       code="overloaded", headers={"Retry-After": "2"}) from None


@dataclass
class Step:
    """One engine chunk as the routes show it: the text the tool-call buffer lets out with it
    and, on the last chunk, the text it held to the end (`tail`). The chunk keeps its own
    tokens' log-probabilities (shown or held), finish reason and usage."""
    text: str
    chunk: Chunk
    tail: str = ""


class Generation:
    """One request's answer as text pieces, then tool calls, finish reason and usage. Without
    a prompt its text is plain, nothing held back (the legacy completions; non-streamed chat,
    which splits the whole text itself)."""

    def __init__(self, state: DaemonState, request: GenerationRequest, prompt: Prompt | None = None):
        engine = state.engine()
        self.state, self.request = state, request
        self.buffer = ToolCallBuffer(engine.tokenizer, prompt.tools if prompt else None,
                                     enabled=prompt.parse_tools if prompt else False)
        self.stop_sequence: str | None = None
        self.finish: str | None = None
        self.calls: list[ToolCall] = []
        self.usage: Usage | None = None
        self.cached_tokens: int | None = None  # of the prompt, from the cache: known from the first piece
        self.logprobs: list[TokenLogprob] = []  # of the text shown so far, if asked (not a call's)

    async def texts(self) -> AsyncGenerator[str, None]:
        """Text to show, piece by piece ("" pieces included: the first one says generation
        has started). Tool calls are held back and parsed at the end."""
        async with aclosing(self.pieces()) as pieces:  # closed with us: a client that left stops it
            async for piece in pieces:
                yield piece.text

    async def pieces(self) -> AsyncGenerator[Piece, None]:
        """texts(), each piece with the log-probabilities of the tokens up to it (text the
        tool-call buffer holds back brings its tokens' with it; a call's own are dropped)."""
        held: list[TokenLogprob] = []
        tail = ""
        async with aclosing(self.steps()) as steps:
            async for step in steps:
                held += step.chunk.logprobs
                tail = step.tail
                if step.text:
                    yield self._shown(step.text, held)
                    held = []
                else:
                    yield Piece("")
        yield self._shown(tail, [] if self.calls else held)

    async def steps(self) -> AsyncGenerator[Step, None]:
        """The engine's chunks, one step each; at the last one (the one with a finish reason)
        the held-back text is parsed: its tool calls are `calls` from then on."""
        chunks = chunks_of(self.state, self.request)
        try:
            async for chunk in chunks:
                if self.cached_tokens is None:
                    self.cached_tokens = chunk.cached_tokens
                step = Step(self.buffer.feed(chunk.text), chunk)
                if chunk.finish_reason:  # the engine matched stop sequences itself
                    self.finish, self.usage = chunk.finish_reason, chunk.usage
                    self.stop_sequence = chunk.stop_sequence
                    step.tail, self.calls = self.buffer.finish()
                yield step
        finally:
            await chunks.aclose()

    def _shown(self, text: str, logprobs: list[TokenLogprob]) -> Piece:
        self.logprobs += logprobs
        return Piece(text, logprobs)
