"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models (and one of them)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator, Callable, cast

from aiohttp import web

from kvtier.prompt_bound import PromptTooLong
from kvtier.requests import Chunk, GenerationRequest, TokenLogprob

from .. import sse
from ..bodies import read_body
from ..bodies_openai import ChatCompletionRequest, ChatMessage, CompletionRequest, OpenAISampling
from ..errors import INTERNAL_ERROR, ApiError
from ..state import STATE, DaemonState
from .budget import NoRoom, fitting_budget
from .generation import LEAST_LOGPROB, Generation, Prompt, Step, render, token_logprobs, too_long
from .models import weight_bytes
from .tools import ToolCall, split_tool_calls
from .usage import openai_usage

log = logging.getLogger("kvtier.openai")
routes = web.RouteTableDef()

# -- request parsing --------------------------------------------------------------------
def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """Checked chat messages as the chat template takes them: content as text, "developer"
    as "system", tool calls with their arguments as objects (as mlx_lm.server does)."""
    parsed = []
    for message in messages:
        content = message.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        out: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role,
               "content": content or ""}
        out.update(message.model_dump(include={"name", "tool_call_id"}, exclude_none=True))
        if message.tool_calls:
            out["tool_calls"] = [call.template() for call in message.tool_calls]
        parsed.append(out)
    return parsed


def parse_generation(body: OpenAISampling, state: DaemonState, tokens: list[int],
                     param: str) -> GenerationRequest:
    """The request's sampling, and its budget under OpenAI's policy; `param`: the route's
    prompt field, which a refusal names."""
    # OpenAI's current field wins over the deprecated one when both are sent.
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    try:
        max_tokens = fitting_budget(state, len(tokens), asked).tokens
    except NoRoom as full:
        wanted = f"max_tokens asks for {asked} more" if asked else "no room is left for an answer"
        raise ApiError(400, f"this model's context is {full.limit} tokens; the prompt has "
                            f"{len(tokens)} and {wanted}",
                       param=param, code="context_length_exceeded") from None
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    return GenerationRequest(prompt_tokens=tokens, max_tokens=max_tokens,
                             temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                             stop=stop)


# -- responses --------------------------------------------------------------------------
def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    """A choice's (or a stream chunk's) `logprobs`: an entry per token."""
    return {"content": token_logprobs(entries), "refusal": None}


def completion_logprobs(entries: list[TokenLogprob], offset: int) -> dict:
    """The legacy completions' `logprobs`; `offset`: where the first token's text starts in
    the choice's text (after an echoed prompt and the tokens before)."""
    tokens = [e.token.decode(errors="replace") for e in entries]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens,
            "token_logprobs": [max(e.logprob, LEAST_LOGPROB) for e in entries],
            "top_logprobs": [{raw.decode(errors="replace"): max(value, LEAST_LOGPROB) for raw, value in e.top}
                             for e in entries],
            "text_offset": offsets}


async def collect(generation: Generation) -> tuple[str, Chunk, list[TokenLogprob]]:
    """The whole answer as the model wrote it (tool-call markup included), its last chunk,
    and all its tokens' log-probabilities if asked (a call's too)."""
    texts, last, logprobs = [], None, []
    async with aclosing(generation.steps()) as steps:
        async for step in steps:
            texts.append(step.chunk.text)
            logprobs += step.chunk.logprobs
            last = step.chunk
    assert last is not None  # a generation ends with its last chunk, or raises
    return "".join(texts), last, logprobs


async def stream_chunks(http: web.Request, generation: Generation, frame: Callable[[Step], dict],
                        usage_chunk: dict | None) -> web.StreamResponse:
    """Each step (an engine chunk) as an SSE `data:` line, after the last one a chunk of the
    usage and no choices if asked (`usage_chunk`: its other fields), then `data: [DONE]`. A
    failure after the headers ends the stream with a `data:` error object instead (the
    `openai` SDK raises it)."""
    async def events(send: sse.Send, step: Step | None, steps: AsyncIterator[Step]) -> None:
        try:
            while step is not None:
                await send(frame(step))
                if step.chunk.finish_reason and usage_chunk is not None:
                    await send(dict(usage_chunk, choices=[], usage=openai_usage(step.chunk.usage)))
                step = await anext(steps, None)
        except ConnectionResetError:
            raise  # the client left: not a failure of ours
        except Exception:
            log.exception("generation failed mid-stream")
            await send(ApiError(500, INTERNAL_ERROR, type_="server_error").body())
            return
        await send("[DONE]")

    return await sse.stream(http, generation.steps(), events)


def finish_reason(chunk: Chunk) -> str:
    return "length" if chunk.finish_reason == "length" else "stop"


# -- routes -----------------------------------------------------------------------------
@routes.post("/v1/chat/completions")
async def chat_completions(http: web.Request) -> web.StreamResponse:
    state = http.app[STATE]
    body = await read_body(http, ChatCompletionRequest)
    model = await state.select_model(body.model)
    messages = template_messages(body.messages)
    tools = cast("list[dict] | None", body.tools or None)  # bodies.Sent: the dicts as sent
    # Tool calls are parsed from the output when the request offers tools (not tool_choice
    # "none") and mlx-lm knows the model's tool-call format; otherwise output is plain text.
    parse_tools = bool(tools) and body.tool_choice != "none"
    include_usage = body.stream_options.include_usage
    engine = state.engine()
    prompt = Prompt(messages, tools, "", parse_tools)
    tokens, boundaries = await render(state, prompt)
    request = parse_generation(body, state, tokens, "messages")
    request.boundaries, request.logprobs = boundaries, body.logprobs_asked
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    base = {"id": ident, "created": created, "model": model,
            "system_fingerprint": engine.fingerprint[:16]}

    if not body.stream:
        # The whole text is split at the end (what surrounds the calls stripped as one), so
        # the generation holds nothing back; streamed, only the text after a call is stripped.
        text, last, logprobs = await collect(Generation(state, request))
        calls: list[ToolCall] = []
        if parse_tools:
            text, calls = split_tool_calls(text, engine.tokenizer, tools)
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if calls:
            message.update(content=text or None, tool_calls=[c.openai() for c in calls])
        return web.json_response(dict(base, object="chat.completion", choices=[{
            "index": 0, "message": message,
            "finish_reason": "tool_calls" if calls else finish_reason(last),
            "logprobs": chat_logprobs(logprobs) if body.logprobs else None}],
            usage=openai_usage(last.usage)))

    generation, sent_role = Generation(state, request, prompt), False
    chunk_base = dict(base, object="chat.completion.chunk")

    def frame(step: Step) -> dict:
        """A chunk's delta: the text the tool-call buffer lets out, and with the last one the
        rest and the calls; its logprobs are its own tokens', shown or held back."""
        nonlocal sent_role
        chunk = step.chunk
        delta: dict = {"content": step.text + step.tail}
        if chunk.finish_reason and generation.calls:
            delta["tool_calls"] = [c.openai(index) for index, c in enumerate(generation.calls)]
        if not sent_role:
            delta["role"], sent_role = "assistant", True
        reason = ("tool_calls" if generation.calls else finish_reason(chunk)) if chunk.finish_reason else None
        return dict(chunk_base, choices=[{
            "index": 0, "delta": delta, "logprobs": chat_logprobs(chunk.logprobs) if body.logprobs else None,
            "finish_reason": reason}])

    return await stream_chunks(http, generation, frame, chunk_base if include_usage else None)


@routes.post("/v1/completions")
async def completions(http: web.Request) -> web.StreamResponse:
    state = http.app[STATE]
    body = await read_body(http, CompletionRequest)
    model = await state.select_model(body.model)
    include_usage = body.stream_options.include_usage
    engine = state.engine()
    try:
        tokens = await asyncio.to_thread(engine.renderer.text_tokens, body.prompt, state.context_limit())
    except PromptTooLong as exc:
        raise too_long(exc, "prompt") from None
    if not tokens:
        raise ApiError(400, "'prompt' must not be empty", param="prompt")
    request = parse_generation(body, state, tokens, "prompt")
    request.logprobs = body.logprobs
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": model,
            "system_fingerprint": engine.fingerprint[:16]}

    generation = Generation(state, request)  # plain text: no tool calls in it
    echoed = body.prompt if body.echo else ""
    asked = body.logprobs is not None
    if not body.stream:
        text, last, logprobs = await collect(generation)
        return web.json_response(dict(base, choices=[{
            "index": 0, "text": echoed + text, "finish_reason": finish_reason(last),
            "logprobs": completion_logprobs(logprobs, len(echoed)) if asked else None}],
            usage=openai_usage(last.usage)))

    offset = len(echoed)  # where the next token's text starts, as in the whole text

    def frame(step: Step) -> dict:
        chunk = step.chunk
        nonlocal echoed, offset  # the prompt goes out once, before the first piece of the completion
        text, echoed = echoed + chunk.text, ""
        logprobs = completion_logprobs(chunk.logprobs, offset) if asked else None
        offset += sum(len(token) for token in logprobs["tokens"]) if logprobs else 0
        return dict(base, choices=[{"index": 0, "text": text, "logprobs": logprobs,
                                    "finish_reason": finish_reason(chunk) if chunk.finish_reason else None}])

    return await stream_chunks(http, generation, frame, base if include_usage else None)


@routes.get("/v1/models")
async def list_models(http: web.Request) -> web.Response:
    """Every configured model, then its aliases, with what the model they name is doing
    (kvtier's fields beside OpenAI's: state, weight_bytes, hot_bytes)."""
    state = http.app[STATE]
    return web.json_response({"object": "list", "data": [_model_entry(state, name) for name in state.names.listed()]})


@routes.get("/v1/models/{model:.+}")  # a repo id or a path has slashes, sent as they are or as %2F
async def retrieve_model(http: web.Request) -> web.Response:
    """The entry /v1/models lists for that name (`client.models.retrieve`); 404 for another."""
    state, name = http.app[STATE], http.match_info["model"]
    if name not in state.names.listed():
        raise ApiError(404, f"no model '{name}' is listed here (see /v1/models)", param="model",
                       code="model_not_found")
    return web.json_response(_model_entry(state, name))


def _model_entry(state: DaemonState, name: str) -> dict:
    return {"id": name, "object": "model", "created": state.started, "owned_by": "kvtier",
            **_model_fields(state, name)}


def _model_fields(state: DaemonState, name: str) -> dict:
    spec = state.names.spec_named(name)
    served = state.worker.models.get(spec.name) if spec is not None else None
    if served is None:  # not served yet (an --allow-any-model name before its first request)
        return {"state": "unloaded", "weight_bytes": 0, "hot_bytes": 0}
    return {"state": served.state, "weight_bytes": weight_bytes(served), "hot_bytes": served.hot_bytes()}
