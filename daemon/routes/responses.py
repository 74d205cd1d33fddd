"""OpenAI's Responses API: POST /v1/responses (streamed and not), what Codex-style agents speak.

`input` (a string, or items: messages, `function_call`, `function_call_output`) and
`instructions` become the same chat-template messages the other routes build, so all three
APIs share one prefix cache. `previous_response_id` is cheap here: the daemon keeps the
messages of its last responses in memory (those not sent with `store: false`) and the prefix
cache makes replaying them nearly free; an id it no longer has is a 400.

Usage: `input_tokens` is the whole prompt and `input_tokens_details.cached_tokens` the part
restored from the cache, as in Chat Completions; `cache_write_tokens` is the part computed
(everything computed is cached).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, AsyncIterator

from aiohttp import web

from kvtier.engine import GenerationRequest, Usage

from ..disconnects import client_gone
from ..errors import ApiError, field, json_body
from ..state import STATE, DaemonState
from .anthropic import Generation, Prompt
from .tools import ToolCall

log = logging.getLogger("kvtier.responses")

routes = web.RouteTableDef()

STORED_RESPONSES = 256  # conversations kept for previous_response_id, most recent first
_CONVERSATIONS = web.AppKey("responses_conversations", OrderedDict)


# -- request parsing --------------------------------------------------------------------
def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _text_of(content: Any, param: str) -> str:
    """A message's content: a string, or text parts (input_text, output_text, text)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad("content must be a string or an array of content parts", param)
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("input_image", "input_file", "input_audio"):
            raise bad(f"'{kind}' parts are not supported; this model takes text only",
                      f"{param}[{i}]")
        elif kind == "refusal":
            texts.append(part.get("refusal") or "")
        else:
            raise bad("each content part needs a 'type' of input_text or output_text and a "
                      "string 'text'", f"{param}[{i}]")
    return "".join(texts)


def _input_call(item: dict, param: str) -> dict:
    """A `function_call` input item as an HF-shaped tool call (arguments an object)."""
    if not isinstance(item.get("call_id"), str) or not isinstance(item.get("name"), str):
        raise bad("function_call items need a string 'call_id' and 'name'", param)
    arguments = item.get("arguments", "")
    if not isinstance(arguments, str):
        raise bad("'arguments' must be a JSON string", f"{param}.arguments")
    try:
        decoded = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        raise bad("'arguments' must be a JSON object encoded as a string", f"{param}.arguments") from None
    return {"id": item["call_id"], "type": "function",
            "function": {"name": item["name"], "arguments": decoded}}


def parse_input(value: Any, param: str = "input") -> list[dict]:
    """`input` as chat-template messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise bad("'input' must be a string or an array of input items", param)
    out: list[dict] = []
    for i, item in enumerate(value):
        where = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise bad("each input item must be an object", where)
        kind = item.get("type", "message")
        if kind == "message":
            role = {"developer": "system"}.get(item.get("role"), item.get("role"))
            if role not in ("user", "assistant", "system"):
                raise bad(f"role {item.get('role')!r} is not supported; use 'user', 'assistant', "
                          "'system' or 'developer'", f"{where}.role")
            out.append({"role": role, "content": _text_of(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call = _input_call(item, where)
            if out and out[-1]["role"] == "assistant":  # calls join the turn that made them
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise bad("function_call_output items need a string 'call_id'", where)
            output = item.get("output")
            text = output if isinstance(output, str) else _text_of(output, f"{where}.output")
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": text})
        elif kind == "reasoning":
            continue  # this daemon never produces them; a client may send them back
        else:
            raise bad(f"input items of type '{kind}' are not supported", f"{where}.type")
    return out


@dataclass
class Tools:
    template: list[dict] | None  # function tools in the HF shape, for the chat template
    echoed: list[dict]           # the request's tools, as the response repeats them
    namespaces: dict[str, str]   # function name -> the `namespace` tool that holds it


def parse_tools(body: dict) -> Tools:
    """Function tools, also those grouped in `namespace` tools (Codex sends both), go to the
    template. Built-in tools (`web_search`, …) run on OpenAI's servers, not here: they are not
    offered to the model, and logged once, rather than refused (agents send them anyway)."""
    tools = field(body, "tools", list, None) or []
    found = Tools([], [], {})
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
            raise bad("each tool must be an object with a 'type'", f"tools[{i}]")
        if tool["type"] == "function":
            found.template.append(_function(tool, f"tools[{i}]"))
            found.echoed.append(_echoed(tool, found.template[-1]["function"]))
            continue
        found.echoed.append(tool)
        if tool["type"] == "namespace" and isinstance(tool.get("tools"), list):
            for j, inner in enumerate(tool["tools"]):
                if isinstance(inner, dict) and inner.get("type") == "function":
                    found.template.append(_function(inner, f"tools[{i}].tools[{j}]"))
                    found.namespaces[inner["name"]] = str(tool.get("name"))
        elif tool["type"] not in _SKIPPED_LOGGED:
            _SKIPPED_LOGGED.add(tool["type"])
            log.info("built-in tool type '%s' is not available here; not offered to the model",
                     tool["type"])
    found.template = found.template or None
    return found


_SKIPPED_LOGGED: set[str] = set()


def _function(tool: dict, param: str) -> dict:
    if not isinstance(tool.get("name"), str) or not tool["name"]:
        raise bad("each function tool needs a string 'name'", f"{param}.name")
    parameters = tool.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise bad("'parameters' must be a JSON schema object", f"{param}.parameters")
    function = {"name": tool["name"]}  # in the order templates print it (tojson keeps it)
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    function["parameters"] = parameters
    return {"type": "function", "function": function}


def _echoed(tool: dict, function: dict) -> dict:
    return {"type": "function", "name": function["name"], "description": tool.get("description"),
            "parameters": function["parameters"], "strict": bool(tool.get("strict", False))}


def parse_tool_choice(body: dict) -> Any:
    choice = body.get("tool_choice", "auto")
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "name": choice["name"]}
    raise bad("'tool_choice' must be 'auto', 'none', 'required' or {\"type\": \"function\", "
              "\"name\": ...}", "tool_choice")


def history(http: web.Request, body: dict) -> tuple[str | None, list[dict]]:
    """The earlier turns named by `previous_response_id`, if any."""
    previous = field(body, "previous_response_id", str, None)
    if previous is None:
        return None, []
    conversations = http.app[_CONVERSATIONS]
    if previous not in conversations:
        raise bad(f"Previous response with id '{previous}' not found (this daemon keeps its "
                  f"last {STORED_RESPONSES} stored responses, in memory)",
                  "previous_response_id", code="previous_response_not_found")
    conversations.move_to_end(previous)
    return previous, list(conversations[previous])


def remember(http: web.Request, response_id: str, messages: list[dict]) -> None:
    conversations = http.app[_CONVERSATIONS]
    conversations[response_id] = messages
    while len(conversations) > STORED_RESPONSES:
        conversations.popitem(last=False)


def generation_request(body: dict, state: DaemonState, tokens: list[int],
                       boundaries: list[int]) -> GenerationRequest:
    max_tokens = field(body, "max_output_tokens", int, None, minimum=1)
    limit = state.engine().context_length
    if limit and len(tokens) >= limit:
        raise bad(f"this model's context is {limit} tokens; the input has {len(tokens)}",
                  "input", code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = state.config.max_tokens_default
    if limit:  # answer up to the end of the context (status "incomplete" there)
        max_tokens = min(max_tokens, limit - len(tokens))
    return GenerationRequest(prompt_tokens=tokens, max_tokens=max_tokens,
                             temperature=field(body, "temperature", float, 1.0, minimum=0, maximum=2),
                             top_p=field(body, "top_p", float, 1.0, minimum=0, maximum=1),
                             boundaries=boundaries)


# -- the response object ----------------------------------------------------------------
def usage_json(usage: Usage) -> dict:
    return {"input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_tokens,
                                     "cache_write_tokens": usage.computed_tokens},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "kvtier": {"ram_tokens": usage.ram_tokens, "disk_tokens": usage.disk_tokens,
                       "shared_tokens": usage.shared_tokens, "computed_tokens": usage.computed_tokens,
                       "time_to_first_token": round(usage.prefill_seconds, 4)}}


def message_item(item_id: str, text: str, status: str = "completed") -> dict:
    content = [] if status == "in_progress" else [output_text(text)]
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": content}


def output_text(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(call: ToolCall, namespaces: dict[str, str], status: str = "completed") -> dict:
    arguments = "" if status == "in_progress" else json.dumps(call.arguments, ensure_ascii=False)
    item = {"id": f"fc_{call.id}", "type": "function_call", "status": status,
            "call_id": call.id, "name": call.name, "arguments": arguments}
    if call.name in namespaces:
        item["namespace"] = namespaces[call.name]
    return item


class Answer:
    """One response's fixed fields, and its output as the generation fills it in."""

    def __init__(self, body: dict, model: str, instructions: str | None, tools: Tools,
                 tool_choice: Any, previous: str | None, request: GenerationRequest):
        self.namespaces = tools.namespaces
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.base = {
            "id": self.id, "object": "response", "created_at": int(time.time()),
            "model": model, "instructions": instructions, "tools": tools.echoed,
            "tool_choice": tool_choice, "previous_response_id": previous,
            "parallel_tool_calls": bool(body.get("parallel_tool_calls", True)),
            "temperature": request.temperature, "top_p": request.top_p,
            "max_output_tokens": body.get("max_output_tokens"),
            "metadata": body.get("metadata") if isinstance(body.get("metadata"), dict) else {},
            "store": body.get("store", True) is not False, "text": {"format": {"type": "text"}},
            "truncation": "disabled", "reasoning": None, "error": None,
            "incomplete_details": None}

    def snapshot(self, status: str, output: list[dict], usage: Usage | None = None,
                 incomplete: bool = False) -> dict:
        out = dict(self.base, status=status, output=output, completed_at=None)
        if usage is not None:
            out["usage"] = usage_json(usage)
        if status in ("completed", "incomplete"):
            out["completed_at"] = int(time.time())
        if incomplete:
            out["incomplete_details"] = {"reason": "max_output_tokens"}
        return out

    def final(self, text: str, calls: list[ToolCall], finish: str | None, usage: Usage) -> dict:
        """The finished response: the text as a message item, then one item per tool call."""
        output = []
        if text or not calls:
            output.append(message_item(self.message_id, text))
        output.extend(call_item(call, self.namespaces) for call in calls)
        incomplete = finish == "length" and not calls
        return self.snapshot("incomplete" if incomplete else "completed", output, usage, incomplete)

    def of(self, text: str, generation: Generation) -> dict:
        return self.final(text, generation.calls, generation.finish, generation.usage)


def answered_messages(messages: list[dict], text: str, generation: Generation) -> list[dict]:
    """The conversation after this answer, as the next turn's template will see it."""
    turn: dict = {"role": "assistant", "content": text}
    if generation.calls:
        turn["tool_calls"] = [{"id": call.id, "type": "function", "function": {
            "name": call.name, "arguments": call.arguments}} for call in generation.calls]
    return [*messages, turn]


# -- the route --------------------------------------------------------------------------
@routes.post("/v1/responses")
async def create_response(http: web.Request) -> web.StreamResponse:
    state = http.app[STATE]
    body = await json_body(http)
    model = state.requested_model(body)
    if "input" not in body:
        raise bad("missing required parameter: 'input'", "input")
    previous, earlier = history(http, body)
    conversation = [*earlier, *parse_input(body["input"])]
    instructions = field(body, "instructions", str, None)
    tools = parse_tools(body)
    tool_choice = parse_tool_choice(body)
    stream = field(body, "stream", bool, False)
    # Instructions are not carried over to the next response (as with OpenAI).
    messages = ([{"role": "system", "content": instructions}] if instructions else []) + conversation
    if not messages:
        raise bad("'input' must not be empty", "input")
    engine = state.engine()

    def tokenize() -> tuple[list[int], list[int]]:
        tokens = engine.chat_tokens(messages, tools.template)
        return tokens, engine.message_boundaries(messages, tools.template, tokens)

    tokens, boundaries = await asyncio.to_thread(tokenize)
    request = generation_request(body, state, tokens, boundaries)
    prompt = Prompt(messages, tools.template, "", bool(tools.template) and tool_choice != "none")
    generation = Generation(state, request, prompt)
    answer = Answer(body, model, instructions, tools, tool_choice, previous, request)

    if not stream:
        text = "".join([piece async for piece in generation.texts()])
        result = answer.of(text, generation)
        if result["store"]:
            remember(http, answer.id, answered_messages(conversation, text, generation))
        return web.json_response(result)
    return await stream_events(http, generation, answer, conversation)


async def stream_events(http: web.Request, generation: Generation, answer: Answer,
                        conversation: list[dict]) -> web.StreamResponse:
    """The Responses SSE events. The first piece is awaited before the headers go out, so an
    overloaded queue still gets a status code; a later failure ends with `response.failed`."""
    pieces = generation.texts()
    try:
        piece: str | None = await anext(pieces)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(http)
        sequence = 0

        async def send(kind: str, **data: Any) -> None:
            nonlocal sequence
            payload = {"type": kind, "sequence_number": sequence, **data}
            sequence += 1
            await response.write(f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode())

        try:
            text = await _send_events(send, generation, answer, piece, pieces)
            await response.write_eof()
        except ConnectionResetError:
            return client_gone(http, response)
        if text is not None and answer.base["store"]:
            remember(http, answer.id, answered_messages(conversation, text, generation))
        return response
    finally:
        await pieces.aclose()  # a vanished client cancels its generation here


async def _send_events(send, generation: Generation, answer: Answer, piece: str | None,
                       pieces: AsyncIterator[str]) -> str | None:
    """Send every event; the answer's text, or None when generation failed."""
    await send("response.created", response=answer.snapshot("in_progress", []))
    await send("response.in_progress", response=answer.snapshot("in_progress", []))
    texts: list[str] = []
    where = {"item_id": answer.message_id, "output_index": 0, "content_index": 0}
    try:
        while piece is not None:
            if piece:
                if not texts:
                    await _open_message(send, answer)
                texts.append(piece)
                await send("response.output_text.delta", delta=piece, logprobs=[], **where)
            piece = await anext(pieces, None)
    except ConnectionResetError:
        raise  # the client left: not a failure of ours
    except Exception as exc:
        log.exception("generation failed mid-stream")
        failed = answer.snapshot("failed", [])
        failed["error"] = {"code": "server_error", "message": f"{type(exc).__name__}: {exc}"}
        await send("response.failed", response=failed)
        return None
    text = "".join(texts)
    index = 0
    if texts or not generation.calls:
        if not texts:
            await _open_message(send, answer)
        await send("response.output_text.done", text=text, logprobs=[], **where)
        await send("response.content_part.done", part=output_text(text),
                   **{k: where[k] for k in ("item_id", "output_index", "content_index")})
        await send("response.output_item.done", output_index=0,
                   item=message_item(answer.message_id, text))
        index = 1
    for call in generation.calls:
        item = call_item(call, answer.namespaces)
        await send("response.output_item.added", output_index=index,
                   item=call_item(call, answer.namespaces, "in_progress"))
        await send("response.function_call_arguments.delta", item_id=item["id"],
                   output_index=index, delta=item["arguments"])
        await send("response.function_call_arguments.done", item_id=item["id"],
                   output_index=index, name=call.name, arguments=item["arguments"])
        await send("response.output_item.done", output_index=index, item=item)
        index += 1
    final = answer.of(text, generation)
    await send("response.incomplete" if final["status"] == "incomplete" else "response.completed",
               response=final)
    return text


async def _open_message(send, answer: Answer) -> None:
    await send("response.output_item.added", output_index=0,
               item=message_item(answer.message_id, "", "in_progress"))
    await send("response.content_part.added", item_id=answer.message_id, output_index=0,
               content_index=0, part=output_text(""))


def setup(app: web.Application) -> None:
    app[_CONVERSATIONS] = OrderedDict()
    app.add_routes(routes)
