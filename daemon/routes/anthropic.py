"""Anthropic Messages API: POST /v1/messages (streaming and not), /v1/messages/count_tokens.

Requests become the same chat-template message list the OpenAI route builds (system first,
`tool_use` blocks as assistant `tool_calls`, `tool_result` blocks as role "tool" messages) and
go through the same engine, so both APIs share one prefix cache. Errors come back in
Anthropic's shape: {"type": "error", "error": {"type": ..., "message": ...}}.

Usage: `input_tokens` is the part of the prompt computed for this request,
`cache_read_input_tokens` the part restored from the cache (RAM or disk), and
`cache_creation_input_tokens` is always 0: every computed token is cached anyway, and
counting it under both names would double the prompt in clients that add the three up
(input + cache_read + cache_creation = the whole prompt, as with Anthropic).
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable

from aiohttp import web

from kvtier.requests import GenerationRequest

from .. import sse
from ..bodies import read_body
from ..bodies_anthropic import (
    AnthropicTool,
    CountTokensRequest,
    MessagesRequest,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
)
from ..errors import INTERNAL_ERROR, ApiError, anthropic_body
from ..state import STATE, DaemonState
from ..volatile import drop_billing_line
from .budget import Budget, NoRoom, clamped_budget
from .generation import Generation, Prompt, render
from .tools import ToolCall
from .usage import anthropic_start_usage, anthropic_usage

log = logging.getLogger("kvtier.anthropic")

routes = web.RouteTableDef()

# The error middleware (daemon/errors.py) answers every failure of these routes in
# Anthropic's shape: {"type": "error", "error": {"type": ..., "message": ...}}; the body's
# fields are checked by its model (daemon/bodies_anthropic.py), what is left here is how the
# blocks fit the turns they are in.
def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


# -- request parsing --------------------------------------------------------------------
def _blocks(content: str | list) -> list:
    """Content as a list of blocks: a string is one text block."""
    return [TextBlock(type="text", text=content)] if isinstance(content, str) else content


def _unsupported(block: Any, path: str) -> ApiError:
    return bad(f"{path}: unsupported content block type '{block.type}' in this turn")


def _system_text(blocks: list, path: str, keep_billing_line: bool = False) -> str:
    """System text blocks joined with a newline (cache_control is accepted and ignored),
    without Claude Code's per-conversation billing line unless asked to keep it."""
    for i, block in enumerate(blocks):
        if not isinstance(block, TextBlock):
            raise bad(f"{path}.{i}: system blocks must be of type 'text'")
    parts = [block.text for block in blocks]
    return "\n".join(parts if keep_billing_line else drop_billing_line(parts))


def _tool_result_text(block: ToolResultBlock) -> str:
    return "\n".join(part.text for part in _blocks(block.content or []))


def _user_messages(blocks: list, path: str) -> list[dict]:
    """A user turn: text blocks -> user messages, tool_result blocks -> tool messages, in order."""
    out: list[dict] = []
    texts: list[str] = []

    def flush() -> None:
        if texts:
            out.append({"role": "user", "content": "\n".join(texts)})
            texts.clear()

    for i, block in enumerate(blocks):
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolResultBlock):
            flush()
            out.append({"role": "tool", "tool_call_id": block.tool_use_id,
                        "content": _tool_result_text(block)})
        else:
            raise _unsupported(block, f"{path}.{i}")
    flush()
    return out


def _assistant_message(blocks: list, path: str) -> dict:
    """An assistant turn: text, and tool_use blocks as HF-shaped tool_calls (arguments a dict)."""
    texts, calls = [], []
    for i, block in enumerate(blocks):
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolUseBlock):
            calls.append({"id": block.id, "type": "function",
                          "function": {"name": block.name, "arguments": block.input}})
        elif not isinstance(block, ThinkingBlock):  # thinking: a client may echo it back
            raise _unsupported(block, f"{path}.{i}")
    message: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts)}
    if calls:
        message["tool_calls"] = calls
    return message


def parse_tools(tools: list[AnthropicTool] | None) -> list[dict] | None:
    """Tools in the function shape chat templates take (cache_control is ignored)."""
    out = []
    for tool in tools or []:
        function: dict[str, Any] = {"name": tool.name}
        if tool.description is not None:
            function["description"] = tool.description
        function["parameters"] = tool.input_schema
        out.append({"type": "function", "function": function})
    return out or None


def parse_prompt(body: CountTokensRequest, keep_billing_line: bool = False) -> Prompt:
    out: list[dict] = []
    if body.system is not None:
        out.append({"role": "system",
                    "content": _system_text(_blocks(body.system), "system", keep_billing_line)})
    prefill = ""
    last = len(body.messages) - 1
    for i, message in enumerate(body.messages):
        path = f"messages.{i}"
        blocks = _blocks(message.content)
        if message.role == "system":  # a mid-conversation system message: rendered where it stands
            out.append({"role": "system", "content": _system_text(blocks, f"{path}.content",
                                                                  keep_billing_line)})
            continue
        if not blocks and not (message.role == "assistant" and i == last):
            raise bad(f"{path}.content must not be empty")
        if message.role == "user":
            out.extend(_user_messages(blocks, f"{path}.content"))
            continue
        assistant = _assistant_message(blocks, f"{path}.content")
        if i == last and "tool_calls" not in assistant:
            # A final assistant turn is a prefill: the answer continues it.
            prefill = assistant["content"]
            if prefill != prefill.rstrip():
                raise bad(f"{path}: final assistant content cannot end with trailing whitespace")
            continue
        out.append(assistant)
    if not out:
        raise bad("messages: the conversation has nothing to answer", param="messages")
    tools = parse_tools(body.tools)
    # "any" and "tool" cannot be forced without constrained decoding: they act like "auto".
    choice = body.tool_choice.type if body.tool_choice else "auto"
    return Prompt(out, tools, prefill, bool(tools) and choice != "none")


def generation_request(body: MessagesRequest, state: DaemonState, tokens: list[int],
                       boundaries: list[int]) -> tuple[GenerationRequest, Budget]:
    try:  # up to the context's end (stop_reason "model_context_window_exceeded" there)
        budget = clamped_budget(state, len(tokens), body.max_tokens)
    except NoRoom as full:
        raise bad(f"prompt is too long: {len(tokens)} tokens > {full.limit - 1} maximum "
                  f"(this model's context is {full.limit} tokens)") from None
    # Stop sequences are matched here, not in the engine, to know which one matched.
    return GenerationRequest(prompt_tokens=tokens, max_tokens=budget.tokens,
                             temperature=body.temperature, top_p=body.top_p, boundaries=boundaries,
                             stop=body.stop_sequences), budget


# -- the answer --------------------------------------------------------------------------
def stop_reason(generation: Generation, budget: Budget) -> str:
    if generation.calls:
        return "tool_use"
    if generation.stop_sequence is not None:
        return "stop_sequence"
    if generation.finish != "length":
        return "end_turn"
    # Anthropic's names: the request's (or the operator's) limit, or the context's end.
    return "model_context_window_exceeded" if budget.limited_by == "context" else "max_tokens"


def tool_use_block(call: ToolCall) -> dict:
    arguments = call.arguments if isinstance(call.arguments, dict) else {"arguments": call.arguments}
    return {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": call.name,
            "input": arguments}


# -- routes -----------------------------------------------------------------------------
@routes.post("/v1/messages")
async def messages(http: web.Request) -> web.StreamResponse:
    state = http.app[STATE]
    body = await read_body(http, MessagesRequest)
    model = await state.select_model(body.model)
    prompt = parse_prompt(body, state.config.keep_billing_header)
    tokens, boundaries = await render(state, prompt)
    request, budget = generation_request(body, state, tokens, boundaries)
    generation = Generation(state, request, prompt)
    message = {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant",
               "model": model}

    if not body.stream:
        text = "".join([piece async for piece in generation.texts()])
        content = []
        if text or not generation.calls:
            content.append({"type": "text", "text": text.strip() if generation.calls else text})
        content.extend(tool_use_block(call) for call in generation.calls)
        return web.json_response(dict(message, content=content, stop_reason=stop_reason(generation, budget),
                                      stop_sequence=generation.stop_sequence,
                                      usage=anthropic_usage(generation.usage)))
    return await stream_events(http, generation, budget, message)


async def stream_events(http: web.Request, generation: Generation, budget: Budget,
                        message: dict) -> web.StreamResponse:
    """Anthropic's SSE events (named after their `type`); a failure after the first piece
    becomes an `error` event."""
    async def events(send: sse.Send, piece: str, pieces: AsyncIterator[str]) -> None:
        async def send_event(kind: str, data: dict) -> None:
            await send(data, kind)

        await _send_events(send_event, generation, budget, message, piece, pieces)

    return await sse.stream(http, generation.texts(), events)


async def _send_events(send: Callable[[str, dict], Awaitable[None]], generation: Generation,
                       budget: Budget, message: dict, piece: str | None,
                       pieces: AsyncIterator[str]) -> None:
    # The first piece is out, so the prompt's restore is over: message_start gives the split
    # message_delta will (as Anthropic does), with no output yet.
    await send("message_start", {"type": "message_start", "message": dict(
        message, content=[], stop_reason=None, stop_sequence=None, usage=anthropic_start_usage(
        len(generation.request.prompt_tokens), generation.cached_tokens or 0))})
    await send("ping", {"type": "ping"})
    index, text_open = 0, False
    try:
        while piece is not None:
            if piece:
                if not text_open:
                    text_open = True
                    await send("content_block_start", {"type": "content_block_start", "index": index,
                                                       "content_block": {"type": "text", "text": ""}})
                await send("content_block_delta", {"type": "content_block_delta", "index": index,
                                                   "delta": {"type": "text_delta", "text": piece}})
            piece = await anext(pieces, None)
    except ConnectionResetError:
        raise  # the client left: not a failure of ours
    except Exception:
        log.exception("generation failed mid-stream")
        await send("error", anthropic_body(500, INTERNAL_ERROR))
        return
    if not text_open and not generation.calls:
        text_open = True
        await send("content_block_start", {"type": "content_block_start", "index": index,
                                           "content_block": {"type": "text", "text": ""}})
    if text_open:
        await send("content_block_stop", {"type": "content_block_stop", "index": index})
        index += 1
    for call in generation.calls:
        block = tool_use_block(call)
        await send("content_block_start", {"type": "content_block_start", "index": index,
                                           "content_block": dict(block, input={})})
        await send("content_block_delta", {"type": "content_block_delta", "index": index, "delta": {
            "type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}})
        await send("content_block_stop", {"type": "content_block_stop", "index": index})
        index += 1
    await send("message_delta", {"type": "message_delta", "delta": {
        "stop_reason": stop_reason(generation, budget), "stop_sequence": generation.stop_sequence},
        "usage": anthropic_usage(generation.usage)})
    await send("message_stop", {"type": "message_stop"})


@routes.post("/v1/messages/count_tokens")
async def count_tokens(http: web.Request) -> web.Response:
    state = http.app[STATE]
    body = await read_body(http, CountTokensRequest)
    await state.select_model(body.model)
    prompt = parse_prompt(body, state.config.keep_billing_header)
    tokens, _ = await render(state, prompt)
    return web.json_response({"input_tokens": len(tokens)})
