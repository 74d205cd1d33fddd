"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator, Callable

from aiohttp import web

from kvtier.engine import Chunk, Engine, GenerationRequest, Usage

from ..disconnects import client_gone
from ..errors import ApiError, field, json_body
from ..state import DaemonState, STATE
from ..worker import Overloaded
from .tools import ToolCallBuffer, check_openai_tools, split_tool_calls, template_tool_calls

routes = web.RouteTableDef()

MAX_SEED = 2**64 - 1  # mx.random.seed takes an unsigned 64-bit integer


# -- request parsing --------------------------------------------------------------------
def message_text(content: object, index: int) -> str:
    """A message's content as text: a string, or an array of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, "only text content parts are supported",
                               param=f"messages[{index}].content")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise ApiError(400, "message content must be a string or an array of parts",
                   param=f"messages[{index}].content")


def parse_messages(body: dict) -> list[dict]:
    messages = field(body, "messages", list, required=True)
    if not messages:
        raise ApiError(400, "'messages' must not be empty", param="messages")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, "each message needs a string 'role'", param=f"messages[{i}]")
        role = "system" if message["role"] == "developer" else message["role"]
        if role not in ("system", "user", "assistant", "tool"):
            raise ApiError(400, f"unknown role {message['role']!r}", param=f"messages[{i}].role")
        out = {"role": role, "content": message_text(message.get("content"), i)}
        for key in ("name", "tool_call_id"):
            if key in message:
                out[key] = message[key]
        if message.get("tool_calls"):
            out["tool_calls"] = template_tool_calls(message["tool_calls"], f"messages[{i}].tool_calls")
        parsed.append(out)
    return parsed


def parse_stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
        return stop
    raise ApiError(400, "'stop' must be a string or an array of up to 4 strings", param="stop")


def parse_generation(body: dict, state: DaemonState, tokens: list[int]) -> GenerationRequest:
    if field(body, "n", int, 1, minimum=1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    limit = state.context_limit()
    max_tokens = field(body, "max_completion_tokens", int, None, minimum=1)
    max_tokens = field(body, "max_tokens", int, max_tokens, minimum=1)
    if max_tokens is None:
        max_tokens = state.config.max_tokens_default
    if limit and len(tokens) + max_tokens > limit:
        raise ApiError(400, f"this model's context is {limit} tokens; the prompt has "
                            f"{len(tokens)} and max_tokens asks for {max_tokens} more",
                       param="messages", code="context_length_exceeded")
    return GenerationRequest(
        prompt_tokens=tokens,
        max_tokens=max_tokens,
        temperature=field(body, "temperature", float, 1.0, minimum=0, maximum=2),
        top_p=field(body, "top_p", float, 1.0, minimum=0, maximum=1),
        seed=field(body, "seed", int, None, minimum=0, maximum=MAX_SEED),
        stop=parse_stop(body),
    )


# -- responses --------------------------------------------------------------------------
def usage_json(usage: Usage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "kvtier": {"ram_tokens": usage.ram_tokens, "disk_tokens": usage.disk_tokens,
                   "shared_tokens": usage.shared_tokens,
                   "computed_tokens": usage.computed_tokens,
                   "time_to_first_token": round(usage.prefill_seconds, 4),
                   "restore_seconds": round(usage.restore_seconds, 4),
                   "restored_bytes": usage.restored_bytes},
    }


async def chunks_of(state: DaemonState, request: GenerationRequest) -> AsyncIterator[Chunk]:
    try:
        async for chunk in state.worker.generate(request):
            yield chunk
    except Overloaded:
        raise ApiError(503, "too many requests are waiting; retry shortly", type_="server_error",
                       code="overloaded", headers={"Retry-After": "2"}) from None


async def collect(state: DaemonState, request: GenerationRequest) -> tuple[str, Chunk]:
    texts, last = [], None
    async for chunk in chunks_of(state, request):
        texts.append(chunk.text)
        last = chunk
    return "".join(texts), last


async def stream_sse(http: web.Request, state: DaemonState, request: GenerationRequest,
                     frame: Callable[[Chunk], list[dict]]) -> web.StreamResponse:
    """Send each chunk as SSE `data:` lines; the first chunk is awaited before headers go out
    so errors such as an overloaded queue still get a proper status code."""
    chunks = chunks_of(state, request)
    try:
        chunk: Chunk | None = await anext(chunks)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(http)
        try:
            while chunk is not None:
                for payload in frame(chunk):
                    await response.write(f"data: {json.dumps(payload)}\n\n".encode())
                chunk = await anext(chunks, None)
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:
            return client_gone(http, response)
        return response
    finally:
        await chunks.aclose()  # a vanished client cancels its generation here


def finish_reason(chunk: Chunk) -> str:
    return "length" if chunk.finish_reason == "length" else "stop"


# -- routes -----------------------------------------------------------------------------
@routes.post("/v1/chat/completions")
async def chat_completions(http: web.Request) -> web.StreamResponse:
    state = http.app[STATE]
    body = await json_body(http)
    model = state.requested_model(body)
    messages = parse_messages(body)
    tools = check_openai_tools(field(body, "tools", list, None) or []) or None
    # Tool calls are parsed from the output when the request offers tools (not tool_choice
    # "none") and mlx-lm knows the model's tool-call format; otherwise output is plain text.
    parse_tools = bool(tools) and body.get("tool_choice") != "none"
    stream = field(body, "stream", bool, False)
    include_usage = bool(field(body, "stream_options", dict, {}).get("include_usage"))
    engine = state.engine()

    def tokenize() -> tuple[list[int], list[int]]:
        tokens = engine.chat_tokens(messages, tools)
        return tokens, engine.message_boundaries(messages, tools, tokens)

    tokens, boundaries = await asyncio.to_thread(tokenize)
    request = parse_generation(body, state, tokens)
    request.boundaries = boundaries
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    base = {"id": ident, "created": created, "model": model,
            "system_fingerprint": engine.fingerprint[:16]}

    if not stream:
        text, last = await collect(state, request)
        calls = []
        if parse_tools:
            text, calls = split_tool_calls(text, engine.tokenizer, tools)
        message = {"role": "assistant", "content": text, "refusal": None}
        if calls:
            message.update(content=text or None, tool_calls=[c.openai() for c in calls])
        return web.json_response(dict(base, object="chat.completion", choices=[{
            "index": 0, "message": message,
            "finish_reason": "tool_calls" if calls else finish_reason(last), "logprobs": None}],
            usage=usage_json(last.usage)))

    sent_role = False
    buffer = ToolCallBuffer(engine.tokenizer, tools, enabled=parse_tools)

    def frame(chunk: Chunk) -> list[dict]:
        nonlocal sent_role
        delta: dict = {"content": buffer.feed(chunk.text)}
        calls = []
        if chunk.finish_reason:
            tail, calls = buffer.finish()
            delta["content"] += tail
            if calls:
                delta["tool_calls"] = [c.openai(index) for index, c in enumerate(calls)]
        if not sent_role:
            delta["role"], sent_role = "assistant", True
        reason = ("tool_calls" if calls else finish_reason(chunk)) if chunk.finish_reason else None
        out = [dict(base, object="chat.completion.chunk", choices=[{
            "index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}])]
        if chunk.finish_reason and include_usage:
            out.append(dict(base, object="chat.completion.chunk", choices=[],
                            usage=usage_json(chunk.usage)))
        return out

    return await stream_sse(http, state, request, frame)


@routes.post("/v1/completions")
async def completions(http: web.Request) -> web.StreamResponse:
    state = http.app[STATE]
    body = await json_body(http)
    model = state.requested_model(body)
    prompt = field(body, "prompt", str, required=True)
    stream = field(body, "stream", bool, False)
    include_usage = bool(field(body, "stream_options", dict, {}).get("include_usage"))
    engine = state.engine()
    tokens = await asyncio.to_thread(engine.text_tokens, prompt)
    if not tokens:
        raise ApiError(400, "'prompt' must not be empty", param="prompt")
    request = parse_generation(body, state, tokens)
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": model,
            "system_fingerprint": engine.fingerprint[:16]}

    if not stream:
        text, last = await collect(state, request)
        return web.json_response(dict(base, choices=[{
            "index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(last)}],
            usage=usage_json(last.usage)))

    def frame(chunk: Chunk) -> list[dict]:
        out = [dict(base, choices=[{"index": 0, "text": chunk.text, "logprobs": None,
                                    "finish_reason": finish_reason(chunk) if chunk.finish_reason else None}])]
        if chunk.finish_reason and include_usage:
            out.append(dict(base, choices=[], usage=usage_json(chunk.usage)))
        return out

    return await stream_sse(http, state, request, frame)


@routes.get("/v1/models")
async def list_models(http: web.Request) -> web.Response:
    state = http.app[STATE]
    return web.json_response({"object": "list", "data": [
        {"id": name, "object": "model", "created": state.started, "owned_by": "kvtier"}
        for name in state.names.listed()]})
