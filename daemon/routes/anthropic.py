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

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from aiohttp import web

from kvtier.engine import GenerationRequest, Usage

from ..disconnects import client_gone
from ..errors import ApiError, anthropic_body, field, json_body
from ..state import STATE, DaemonState
from ..volatile import drop_billing_line
from .openai import chunks_of
from .tools import ToolCall, ToolCallBuffer

log = logging.getLogger("kvtier.anthropic")

routes = web.RouteTableDef()

# -- errors -----------------------------------------------------------------------------
# The error middleware (daemon/errors.py) answers every failure of these routes in
# Anthropic's shape: {"type": "error", "error": {"type": ..., "message": ...}}.
def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


# -- request parsing --------------------------------------------------------------------
@dataclass
class Prompt:
    messages: list[dict]     # chat-template messages, without a trailing prefill
    tools: list[dict] | None  # tools in the OpenAI/HF function shape
    prefill: str              # a final assistant text the answer continues ("" if none)
    parse_tools: bool         # whether to read tool calls out of the answer


def _blocks(content: Any, path: str) -> list[dict]:
    """Content as a list of blocks: a string is one text block."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise bad(f"{path} must be a string or an array of content blocks")
    for i, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise bad(f"{path}.{i} must be an object with a 'type'")
    return content


def _text(block: dict, path: str) -> str:
    if not isinstance(block.get("text"), str):
        raise bad(f"{path}.text must be a string")
    return block["text"]


def _unsupported(kind: str, path: str) -> ApiError:
    if kind in ("image", "document", "search_result"):
        return bad(f"{path}: '{kind}' blocks are not supported; this model takes text only")
    return bad(f"{path}: unsupported content block type '{kind}'")


def parse_system(body: dict, keep_billing_line: bool = False) -> str | None:
    system = body.get("system")
    if system is None:
        return None
    return _system_text(_blocks(system, "system"), "system", keep_billing_line)


def _system_text(blocks: list[dict], path: str, keep_billing_line: bool = False) -> str:
    """System text blocks joined with a newline (cache_control is accepted and ignored),
    without Claude Code's per-conversation billing line unless asked to keep it."""
    parts = []
    for i, block in enumerate(blocks):
        if block["type"] != "text":
            raise bad(f"{path}.{i}: system blocks must be of type 'text'")
        parts.append(_text(block, f"{path}.{i}"))
    return "\n".join(parts if keep_billing_line else drop_billing_line(parts))


def _tool_result_text(block: dict, path: str) -> str:
    content = block.get("content")
    if content is None:
        return ""
    parts = []
    for i, part in enumerate(_blocks(content, f"{path}.content")):
        if part["type"] != "text":
            raise _unsupported(part["type"], f"{path}.content.{i}")
        parts.append(_text(part, f"{path}.content.{i}"))
    return "\n".join(parts)


def _user_messages(blocks: list[dict], path: str) -> list[dict]:
    """A user turn: text blocks -> user messages, tool_result blocks -> tool messages, in order."""
    out: list[dict] = []
    texts: list[str] = []

    def flush() -> None:
        if texts:
            out.append({"role": "user", "content": "\n".join(texts)})
            texts.clear()

    for i, block in enumerate(blocks):
        kind, where = block["type"], f"{path}.{i}"
        if kind == "text":
            texts.append(_text(block, where))
        elif kind == "tool_result":
            if not isinstance(block.get("tool_use_id"), str) or not block["tool_use_id"]:
                raise bad(f"{where}.tool_use_id must be a non-empty string")
            if not isinstance(block.get("is_error", False), bool):
                raise bad(f"{where}.is_error must be a boolean")
            flush()
            out.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                        "content": _tool_result_text(block, where)})
        else:
            raise _unsupported(kind, where)
    flush()
    return out


def _assistant_message(blocks: list[dict], path: str) -> dict:
    """An assistant turn: text, and tool_use blocks as HF-shaped tool_calls (arguments a dict)."""
    texts, calls = [], []
    for i, block in enumerate(blocks):
        kind, where = block["type"], f"{path}.{i}"
        if kind == "text":
            texts.append(_text(block, where))
        elif kind == "tool_use":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise bad(f"{where}: tool_use blocks need a string 'id' and 'name'")
            if not isinstance(block.get("input", {}), dict):
                raise bad(f"{where}.input must be an object")
            calls.append({"id": block["id"], "type": "function",
                          "function": {"name": block["name"], "arguments": block.get("input", {})}})
        elif kind in ("thinking", "redacted_thinking"):
            continue  # this daemon never produces them; a client may echo them back
        else:
            raise _unsupported(kind, where)
    message = {"role": "assistant", "content": "\n".join(texts)}
    if calls:
        message["tool_calls"] = calls
    return message


def parse_tools(body: dict) -> list[dict] | None:
    tools = field(body, "tools", list, None)
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
            raise bad(f"tools.{i}: each tool needs a string 'name'")
        if tool.get("type") not in (None, "custom"):
            raise bad(f"tools.{i}: server tools ('{tool['type']}') are not supported; "
                      "define the tool with an input_schema")
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise bad(f"tools.{i}.input_schema must be a JSON schema object")
        function = {"name": tool["name"]}
        if tool.get("description") is not None:
            if not isinstance(tool["description"], str):
                raise bad(f"tools.{i}.description must be a string")
            function["description"] = tool["description"]
        function["parameters"] = schema  # cache_control on a tool is accepted and ignored
        out.append({"type": "function", "function": function})
    return out


def parse_tool_choice(body: dict, tools: list[dict] | None) -> bool:
    """Whether to parse tool calls. "any" and "tool" cannot be forced without constrained
    decoding: they are accepted and act like "auto"."""
    choice = field(body, "tool_choice", dict, None)
    if choice is None:
        return bool(tools)
    if choice.get("type") not in ("auto", "any", "tool", "none"):
        raise bad("tool_choice.type must be one of 'auto', 'any', 'tool', 'none'")
    if choice["type"] == "tool" and not isinstance(choice.get("name"), str):
        raise bad("tool_choice.name must name a tool")
    return bool(tools) and choice["type"] != "none"


def parse_prompt(body: dict, keep_billing_line: bool = False) -> Prompt:
    messages = field(body, "messages", list, required=True)
    if not messages:
        raise bad("messages: at least one message is required", param="messages")
    out: list[dict] = []
    system = parse_system(body, keep_billing_line)
    if system is not None:
        out.append({"role": "system", "content": system})
    prefill = ""
    for i, message in enumerate(messages):
        path = f"messages.{i}"
        if not isinstance(message, dict):
            raise bad(f"{path} must be an object")
        role = message.get("role")
        if role not in ("user", "assistant", "system"):
            raise bad(f"{path}.role: role {role!r} is not supported; use 'user', 'assistant' "
                      "or 'system'")
        if "content" not in message:
            raise bad(f"{path}.content is required")
        blocks = _blocks(message["content"], f"{path}.content")
        if role == "system":  # a mid-conversation system message: rendered where it stands
            out.append({"role": "system", "content": _system_text(blocks, f"{path}.content",
                                                                  keep_billing_line)})
            continue
        if not blocks and not (role == "assistant" and i == len(messages) - 1):
            raise bad(f"{path}.content must not be empty")
        if role == "user":
            out.extend(_user_messages(blocks, f"{path}.content"))
            continue
        assistant = _assistant_message(blocks, f"{path}.content")
        if i == len(messages) - 1 and "tool_calls" not in assistant:
            # A final assistant turn is a prefill: the answer continues it.
            prefill = assistant["content"]
            if prefill != prefill.rstrip():
                raise bad(f"{path}: final assistant content cannot end with trailing whitespace")
            continue
        out.append(assistant)
    if not out:
        raise bad("messages: the conversation has nothing to answer", param="messages")
    tools = parse_tools(body)
    return Prompt(out, tools, prefill, parse_tool_choice(body, tools))


def parse_stop_sequences(body: dict) -> list[str]:
    stops = field(body, "stop_sequences", list, [])
    if not all(isinstance(s, str) and s for s in stops):
        raise bad("stop_sequences must be an array of non-empty strings", param="stop_sequences")
    return stops


async def tokenize(state: DaemonState, prompt: Prompt) -> tuple[list[int], list[int]]:
    engine = state.engine()

    def run() -> tuple[list[int], list[int]]:
        tokens = engine.chat_tokens(prompt.messages, prompt.tools)
        boundaries = engine.message_boundaries(prompt.messages, prompt.tools, tokens)
        if prompt.prefill:
            tokens = tokens + list(engine.tokenizer.encode(prompt.prefill, add_special_tokens=False))
        return tokens, boundaries

    return await asyncio.to_thread(run)


def generation_request(body: dict, state: DaemonState, tokens: list[int],
                       boundaries: list[int]) -> GenerationRequest:
    max_tokens = field(body, "max_tokens", int, required=True, minimum=1)
    temperature = field(body, "temperature", float, 1.0, minimum=0, maximum=1)
    top_p = field(body, "top_p", float, 1.0, minimum=0, maximum=1)
    field(body, "top_k", int, None, minimum=0)  # accepted; the sampler has no top-k
    field(body, "metadata", dict, None)
    limit = state.context_limit()
    if limit and len(tokens) >= limit:
        raise bad(f"prompt is too long: {len(tokens)} tokens > {limit - 1} maximum "
                  f"(this model's context is {limit} tokens)")
    if limit:
        # Agents ask for large budgets (Claude Code: 32000) whatever the model; answer up to
        # the end of the context rather than refuse (stop_reason "max_tokens" there).
        max_tokens = min(max_tokens, limit - len(tokens))
    # Stop sequences are matched here, not in the engine, to know which one matched.
    return GenerationRequest(prompt_tokens=tokens, max_tokens=max_tokens, temperature=temperature,
                             top_p=top_p, boundaries=boundaries)


# -- generation -------------------------------------------------------------------------
class Generation:
    """One request's answer as text pieces, then tool calls, stop reason and usage."""

    def __init__(self, state: DaemonState, request: GenerationRequest, prompt: Prompt):
        engine = state.engine()
        self.state, self.request = state, request
        self.buffer = ToolCallBuffer(engine.tokenizer, prompt.tools, enabled=prompt.parse_tools)
        self.stop_sequence: str | None = None
        self.finish: str | None = None
        self.calls: list[ToolCall] = []
        self.usage: Usage | None = None

    async def texts(self) -> AsyncIterator[str]:
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

    @property
    def stop_reason(self) -> str:
        if self.calls:
            return "tool_use"
        if self.stop_sequence is not None:
            return "stop_sequence"
        return "max_tokens" if self.finish == "length" else "end_turn"


def usage_json(usage: Usage) -> dict:
    return {
        "input_tokens": usage.computed_tokens,
        "cache_creation_input_tokens": 0,  # see the module docstring
        "cache_read_input_tokens": usage.cached_tokens,
        "output_tokens": usage.completion_tokens,
        "kvtier": {"prompt_tokens": usage.prompt_tokens, "ram_tokens": usage.ram_tokens,
                   "disk_tokens": usage.disk_tokens, "shared_tokens": usage.shared_tokens,
                   "computed_tokens": usage.computed_tokens,
                   "time_to_first_token": round(usage.prefill_seconds, 4)},
    }


def tool_use_block(call: ToolCall) -> dict:
    arguments = call.arguments if isinstance(call.arguments, dict) else {"arguments": call.arguments}
    return {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": call.name,
            "input": arguments}


# -- routes -----------------------------------------------------------------------------
@routes.post("/v1/messages")
async def messages(http: web.Request) -> web.StreamResponse:
    state = http.app[STATE]
    body = await json_body(http)
    model = state.requested_model(body)
    prompt = parse_prompt(body, state.config.keep_billing_header)
    stops = parse_stop_sequences(body)
    stream = field(body, "stream", bool, False)
    tokens, boundaries = await tokenize(state, prompt)
    request = generation_request(body, state, tokens, boundaries)
    request.stop = stops
    generation = Generation(state, request, prompt)
    message = {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant",
               "model": model}

    if not stream:
        text = "".join([piece async for piece in generation.texts()])
        content = []
        if text or not generation.calls:
            content.append({"type": "text", "text": text.strip() if generation.calls else text})
        content.extend(tool_use_block(call) for call in generation.calls)
        return web.json_response(dict(message, content=content, stop_reason=generation.stop_reason,
                                      stop_sequence=generation.stop_sequence,
                                      usage=usage_json(generation.usage)))
    return await stream_events(http, generation, message, len(tokens))


async def stream_events(http: web.Request, generation: Generation, message: dict,
                        prompt_tokens: int) -> web.StreamResponse:
    """Anthropic's SSE events. The first piece is awaited before the headers go out, so an
    overloaded queue still gets a status code; later failures become an `error` event."""
    pieces = generation.texts()
    try:
        piece: str | None = await anext(pieces)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(http)

        async def send(event: str, data: dict) -> None:
            await response.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())

        try:
            await _send_events(send, generation, message, prompt_tokens, piece, pieces)
            await response.write_eof()
        except ConnectionResetError:
            return client_gone(http, response)
        return response
    finally:
        await pieces.aclose()  # a vanished client cancels its generation here


async def _send_events(send: Callable[[str, dict], Awaitable[None]], generation: Generation,
                       message: dict, prompt_tokens: int, piece: str | None,
                       pieces: AsyncIterator[str]) -> None:
    # The cache split is known only at the end: message_start counts the whole prompt
    # as input, message_delta then gives the final (cumulative) numbers.
    await send("message_start", {"type": "message_start", "message": dict(
        message, content=[], stop_reason=None, stop_sequence=None,
        usage={"input_tokens": prompt_tokens, "cache_creation_input_tokens": 0,
               "cache_read_input_tokens": 0, "output_tokens": 0})})
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
    except Exception as exc:
        log.exception("generation failed mid-stream")
        await send("error", anthropic_body(500, "internal error (see the daemon log)"))
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
        "stop_reason": generation.stop_reason, "stop_sequence": generation.stop_sequence},
        "usage": usage_json(generation.usage)})
    await send("message_stop", {"type": "message_stop"})


@routes.post("/v1/messages/count_tokens")
async def count_tokens(http: web.Request) -> web.Response:
    state = http.app[STATE]
    body = await json_body(http)
    state.requested_model(body)
    prompt = parse_prompt(body, state.config.keep_billing_header)
    tokens, _ = await tokenize(state, prompt)
    return web.json_response({"input_tokens": len(tokens)})
