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

import json
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, AsyncIterator

from aiohttp import web

from kvtier.requests import GenerationRequest, TokenLogprob, Usage

from .. import sse
from ..bodies import read_body
from ..bodies_responses import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionChoice,
    FunctionTool,
    InputText,
    MessageItem,
    NamespaceTool,
    ResponsesRequest,
)
from ..client_names import OncePerName, shown
from ..errors import INTERNAL_ERROR, ApiError
from ..state import STATE, DaemonState
from .budget import NoRoom, clamped_budget
from .generation import Generation, Piece, Prompt, render, token_logprobs
from .tools import ToolCall
from .usage import responses_usage

log = logging.getLogger("kvtier.responses")

routes = web.RouteTableDef()

STORED_RESPONSES = 256  # conversations kept for previous_response_id, most recent first
_CONVERSATIONS = web.AppKey("responses_conversations", OrderedDict)


# -- request parsing --------------------------------------------------------------------
def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _text_of(content: str | list) -> str:
    """A message's content: a string, or text parts (input_text, output_text, text, refusal)."""
    if isinstance(content, str):
        return content
    return "".join(part.text if isinstance(part, InputText) else part.refusal or ""
                   for part in content)


def _input_call(item: FunctionCallItem) -> dict:
    """A `function_call` input item as an HF-shaped tool call (arguments an object)."""
    arguments = json.loads(item.arguments) if item.arguments.strip() else {}  # checked already
    return {"id": item.call_id, "type": "function",
            "function": {"name": item.name, "arguments": arguments}}


def parse_input(value: str | list) -> list[dict]:
    """`input` as chat-template messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    out: list[dict] = []
    for item in value:
        if isinstance(item, MessageItem):
            role = "system" if item.role == "developer" else item.role
            out.append({"role": role, "content": _text_of(item.content)})
        elif isinstance(item, FunctionCallItem):
            call = _input_call(item)
            if out and out[-1]["role"] == "assistant":  # calls join the turn that made them
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": _text_of(item.output)})
        # reasoning items: this daemon never produces them; a client may send them back
    return out


@dataclass
class Tools:
    template: list[dict] | None  # function tools in the HF shape, for the chat template
    echoed: list[dict]           # the request's tools, as the response repeats them
    namespaces: dict[str, str]   # function name -> the `namespace` tool that holds it


def parse_tools(tools: list) -> Tools:
    """Function tools, also those grouped in `namespace` tools (Codex sends both), go to the
    template. Built-in tools (`web_search`, …) run on OpenAI's servers, not here: they are not
    offered to the model, and logged once, rather than refused (agents send them anyway)."""
    template: list[dict] = []
    found = Tools(template, [], {})
    for tool in tools:
        if isinstance(tool, FunctionTool):
            template.append(_function(tool))
            found.echoed.append(_echoed(tool, template[-1]["function"]))
            continue
        found.echoed.append(tool.model_dump(exclude_unset=True))
        if isinstance(tool, NamespaceTool):
            for inner in tool.tools:
                if isinstance(inner, FunctionTool):
                    template.append(_function(inner))
                    found.namespaces[inner.name] = str(tool.name)
        elif _SKIPPED_LOGGED.first_time(tool.type):
            log.info("built-in tool type %s is not available here; not offered to the model",
                     shown(tool.type))
    found.template = template or None
    return found


_SKIPPED_LOGGED = OncePerName()


def _function(tool: FunctionTool) -> dict:
    function: dict[str, Any] = {"name": tool.name}  # in the order templates print it (tojson keeps it)
    if tool.description is not None:
        function["description"] = tool.description
    function["parameters"] = tool.parameters or {"type": "object", "properties": {}}
    return {"type": "function", "function": function}


def _echoed(tool: FunctionTool, function: dict) -> dict:
    return {"type": "function", "name": function["name"], "description": tool.description,
            "parameters": function["parameters"], "strict": bool(tool.strict)}


def echoed_tool_choice(choice: str | FunctionChoice) -> Any:
    return choice if isinstance(choice, str) else {"type": "function", "name": choice.name}


def history(http: web.Request, previous: str | None) -> tuple[str | None, list[dict]]:
    """The earlier turns named by `previous_response_id`, if any."""
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


def generation_request(body: ResponsesRequest, state: DaemonState, tokens: list[int],
                       boundaries: list[int]) -> GenerationRequest:
    try:  # up to the context's end (status "incomplete" there); none asked (Codex): until the model stops
        max_tokens = clamped_budget(state, len(tokens), body.max_output_tokens).tokens
    except NoRoom as full:
        raise bad(f"this model's context is {full.limit} tokens; the input has {len(tokens)}",
                  "input", code="context_length_exceeded") from None
    return GenerationRequest(prompt_tokens=tokens, max_tokens=max_tokens,
                             temperature=body.temperature, top_p=body.top_p,
                             boundaries=boundaries, logprobs=body.logprobs_asked)


# -- the response object ----------------------------------------------------------------
def message_item(item_id: str, text: str, status: str = "completed",
                 logprobs: list[TokenLogprob] | None = None) -> dict:
    content = [] if status == "in_progress" else [output_text(text, logprobs)]
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": content}


def output_text(text: str, logprobs: list[TokenLogprob] | None = None) -> dict:
    return {"type": "output_text", "text": text, "annotations": [],
            "logprobs": token_logprobs(logprobs or [])}


def call_item(call: ToolCall, namespaces: dict[str, str], status: str = "completed") -> dict:
    arguments = "" if status == "in_progress" else json.dumps(call.arguments, ensure_ascii=False)
    item = {"id": f"fc_{call.id}", "type": "function_call", "status": status,
            "call_id": call.id, "name": call.name, "arguments": arguments}
    if call.name in namespaces:
        item["namespace"] = namespaces[call.name]
    return item


class Answer:
    """One response's fixed fields, and its output as the generation fills it in."""

    def __init__(self, body: ResponsesRequest, model: str, tools: Tools, previous: str | None,
                 request: GenerationRequest):
        self.namespaces = tools.namespaces
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.base = {
            "id": self.id, "object": "response", "created_at": int(time.time()),
            "model": model, "instructions": body.instructions, "tools": tools.echoed,
            "tool_choice": echoed_tool_choice(body.tool_choice), "previous_response_id": previous,
            "parallel_tool_calls": body.parallel_tool_calls,
            "temperature": request.temperature, "top_p": request.top_p,
            "max_output_tokens": body.max_output_tokens, "metadata": body.metadata or {},
            "top_logprobs": body.top_logprobs,
            "store": body.store, "text": {"format": {"type": "text"}},
            "truncation": "disabled", "reasoning": None, "error": None,
            "incomplete_details": None}

    def snapshot(self, status: str, output: list[dict], usage: Usage | None = None,
                 incomplete: bool = False) -> dict:
        out = dict(self.base, status=status, output=output, completed_at=None)
        if usage is not None:
            out["usage"] = responses_usage(usage)
        if status in ("completed", "incomplete"):
            out["completed_at"] = int(time.time())
        if incomplete:
            out["incomplete_details"] = {"reason": "max_output_tokens"}
        return out

    def final(self, text: str, calls: list[ToolCall], finish: str | None, usage: Usage | None,
              logprobs: list[TokenLogprob]) -> dict:
        """The finished response: the text as a message item, then one item per tool call."""
        output = []
        if text or not calls:
            output.append(message_item(self.message_id, text, logprobs=logprobs))
        output.extend(call_item(call, self.namespaces) for call in calls)
        incomplete = finish == "length" and not calls
        return self.snapshot("incomplete" if incomplete else "completed", output, usage, incomplete)

    def of(self, text: str, generation: Generation) -> dict:
        return self.final(text, generation.calls, generation.finish, generation.usage,
                          generation.logprobs)


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
    body = await read_body(http, ResponsesRequest)
    model = await state.select_model(body.model)
    previous, earlier = history(http, body.previous_response_id)
    conversation = [*earlier, *parse_input(body.input)]
    tools = parse_tools(body.tools)
    # Instructions are not carried over to the next response (as with OpenAI).
    instructions = [{"role": "system", "content": body.instructions}] if body.instructions else []
    messages = instructions + conversation
    if not messages:
        raise bad("'input' must not be empty", "input")
    prompt = Prompt(messages, tools.template, "", bool(tools.template) and body.tool_choice != "none")
    tokens, boundaries = await render(state, prompt, param="input")
    request = generation_request(body, state, tokens, boundaries)
    generation = Generation(state, request, prompt)
    answer = Answer(body, model, tools, previous, request)

    if not body.stream:
        text = "".join([piece async for piece in generation.texts()])
        result = answer.of(text, generation)
        if result["store"]:
            remember(http, answer.id, answered_messages(conversation, text, generation))
        return web.json_response(result)
    return await stream_events(http, generation, answer, conversation)


async def stream_events(http: web.Request, generation: Generation, answer: Answer,
                        conversation: list[dict]) -> web.StreamResponse:
    """The Responses SSE events, numbered; a failure after the first piece ends with
    `response.failed`."""
    async def events(send: sse.Send, piece: Piece, pieces: AsyncIterator[Piece]) -> None:
        sequence = 0

        async def send_event(kind: str, **data: Any) -> None:
            nonlocal sequence
            await send({"type": kind, "sequence_number": sequence, **data}, kind)
            sequence += 1

        text = await _send_events(send_event, generation, answer, piece, pieces)
        if text is not None and answer.base["store"]:
            remember(http, answer.id, answered_messages(conversation, text, generation))

    return await sse.stream(http, generation.pieces(), events)


async def _send_events(send, generation: Generation, answer: Answer, piece: Piece | None,
                       pieces: AsyncIterator[Piece]) -> str | None:
    """Send every event; the answer's text, or None when generation failed."""
    await send("response.created", response=answer.snapshot("in_progress", []))
    await send("response.in_progress", response=answer.snapshot("in_progress", []))
    texts: list[str] = []
    where = {"item_id": answer.message_id, "output_index": 0, "content_index": 0}
    try:
        while piece is not None:
            if piece.text:
                if not texts:
                    await _open_message(send, answer)
                texts.append(piece.text)
                await send("response.output_text.delta", delta=piece.text,
                           logprobs=token_logprobs(piece.logprobs), **where)
            piece = await anext(pieces, None)
    except ConnectionResetError:
        raise  # the client left: not a failure of ours
    except Exception:
        log.exception("generation failed mid-stream")
        failed = answer.snapshot("failed", [])
        failed["error"] = {"code": "server_error", "message": INTERNAL_ERROR}
        await send("response.failed", response=failed)
        return None
    text, logprobs = "".join(texts), generation.logprobs
    index = 0
    if texts or not generation.calls:
        if not texts:
            await _open_message(send, answer)
        await send("response.output_text.done", text=text, logprobs=token_logprobs(logprobs), **where)
        await send("response.content_part.done", part=output_text(text, logprobs),
                   **{k: where[k] for k in ("item_id", "output_index", "content_index")})
        await send("response.output_item.done", output_index=0,
                   item=message_item(answer.message_id, text, logprobs=logprobs))
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
