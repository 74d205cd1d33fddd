"""The request bodies of every POST route, as pydantic models: one declaration gives the
checks (types, ranges, required fields, enums, message and content-part unions), the path
of what is wrong (for the API's error body) and the schemas of /openapi.json.

Unknown fields are ignored (clients send many); a top-level null means "not given", as
OpenAI's and Anthropic's servers read it. What only the routes can check (a prompt's token
count against the context, whether a turn may be empty) stays in the routes."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, TypeVar, Union

from aiohttp import web
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .errors import ApiError
from .strict_json import json_body, parse_json
from .validation_errors import invalid_field

MAX_SEED = 2**64 - 1  # mx.random.seed takes an unsigned 64-bit integer

Positive = Annotated[int, Field(ge=1)]
Unit = Annotated[float, Field(ge=0, le=1)]
NonEmpty = Annotated[str, Field(min_length=1)]
JsonObject = dict[str, Any]


class Body(BaseModel):
    # strict: "10" is not an integer and true is not a number (an integer is a number).
    model_config = ConfigDict(strict=True, extra="ignore")


M = TypeVar("M", bound=Body)
T = TypeVar("T")


async def read_body(http: web.Request, model: type[M]) -> M:
    """The request's body: strict JSON (strict_json.json_body), then checked as `model`."""
    return validate(model, await json_body(http))


def validate(model: type[M], body: dict) -> M:
    """The body as `model`, or the API's 400 naming the field that is wrong."""
    given = {key: value for key, value in body.items() if value is not None}
    try:
        return model.model_validate(given)
    except ValidationError as exc:
        raise invalid_field(exc, given) from None


def _keep_as_sent(value: Any, handler: Any) -> Any:
    handler(value)
    return value


# Checked as T, but kept as the client sent it: what goes into the chat template verbatim
# (tool schemas, in the client's key order) must not be re-serialized.
Sent = Annotated[T, WrapValidator(_keep_as_sent)]


def _by_type(known: set[str], default: str | None = None, other: str = "other"):
    """A discriminator: an object's `type` (or `default` without one) when known, else `other`."""
    def kind(value: Any) -> str | None:
        if isinstance(value, BaseModel):
            return getattr(value, "type", None)
        if not isinstance(value, dict):
            return None
        tag = value.get("type", default)
        return tag if tag in known else other
    return Discriminator(kind, custom_error_type="object_type",
                         custom_error_message="must be an object with a 'type'")


def _refuse(message: str) -> PydanticCustomError:
    return PydanticCustomError("unsupported", message)


# -- OpenAI Chat Completions --------------------------------------------------------------
class TextPart(Body):
    type: Literal["text"]
    text: str


class FunctionCallIn(Body):
    name: str
    arguments: Any = Field(default_factory=dict)

    @field_validator("arguments")
    @classmethod
    def _decode(cls, arguments: Any) -> Any:
        """OpenAI sends arguments as JSON text: read as strictly as the body (it goes into
        the prompt), as the dict chat templates expect."""
        if isinstance(arguments, str):
            return strict_json(arguments, "tool call 'arguments'") if arguments.strip() else {}
        return {} if arguments is None else arguments


class ToolCallIn(Body):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCallIn

    def template(self) -> dict:
        """In the shape HF chat templates expect: `arguments` an object."""
        call = {"id": self.id} if self.id is not None else {}
        return dict(call, type="function", function={"name": self.function.name,
                                                     "arguments": self.function.arguments})


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    tool_call_id: Optional[str] = None
    tool_calls: Optional[list[ToolCallIn]] = None


class FunctionDef(Body):
    name: NonEmpty
    description: Optional[str] = None
    parameters: Optional[JsonObject] = None


class ChatTool(Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class StreamOptions(Body):
    include_usage: bool = False


class OpenAISampling(Body):
    model: str
    max_tokens: Optional[Positive] = None
    max_completion_tokens: Optional[Positive] = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Unit = 1.0
    seed: Optional[Annotated[int, Field(ge=0, le=MAX_SEED)]] = None
    n: Annotated[int, Field(ge=1, le=1)] = 1  # one choice per request (an int: Literal[1] took true)
    stop: Union[str, Annotated[list[str], Field(max_length=4)], None] = None
    stream: bool = False
    stream_options: StreamOptions = StreamOptions()


def _not_asked(refusal: str, *allowed: Any) -> Any:
    """A field the API has that this server does not serve: refused unless it is one of the
    values that ask for nothing, rather than answered as if it had not been sent (a null
    `suffix` asked for and left out)."""
    def check(value: Any) -> Any:
        if value is not None and value not in allowed:
            raise _refuse(refusal)
        return value
    return WrapValidator(lambda value, handler: check(handler(value)))


class ChatCompletionRequest(OpenAISampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: Optional[list[Sent[ChatTool]]] = None
    tool_choice: Union[Literal["none", "auto", "required"], JsonObject, None] = None
    logprobs: bool = False
    top_logprobs: Optional[Annotated[int, Field(ge=0, le=20)]] = None

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_tools(cls, choice: Any, info: ValidationInfo) -> Any:
        if "tools" not in info.data:  # the tools were refused themselves: that error is the one
            return choice
        tools = info.data["tools"] or []  # Sent: the dicts as sent
        return _among_tools(choice, _chat_choice_name(choice), {tool["function"]["name"] for tool in tools})

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top and not info.data.get("logprobs"):
            raise _refuse("'top_logprobs' needs 'logprobs': true")
        return top

    @property
    def logprobs_asked(self) -> int | None:
        """How many alternatives each token's entry lists, or None: no log-probabilities."""
        return (self.top_logprobs or 0) if self.logprobs else None


def _chat_choice_name(choice: Any) -> str | None:
    """The function a chat `tool_choice` names ({"type": "function", "function": {"name"}}), or None."""
    if not (isinstance(choice, dict) and choice.get("type") == "function"):
        return None
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise _refuse("a 'function' choice needs the function's name ('function.name')")
    return name


def _among_tools(choice: Any, named: str | None, names: set[str]) -> Any:
    """As OpenAI's API: "required" needs tools, a named function must be one of them."""
    if choice == "required" and not names:
        raise _refuse("'required' needs 'tools'")
    if named is not None and named not in names:
        raise _refuse(f"no function named '{named}' in 'tools'")
    return choice


class CompletionRequest(OpenAISampling):
    prompt: str
    echo: bool = False  # the prompt's text before the completion's, as the API has it
    logprobs: Optional[Annotated[int, Field(ge=0, le=5)]] = None

    @field_validator("logprobs")
    @classmethod
    def _not_of_the_prompt(cls, logprobs: int | None, info: ValidationInfo) -> int | None:
        if logprobs is not None and info.data.get("echo"):  # a cached prefix has no logits to give
            raise _refuse("'logprobs' with 'echo' asks for the prompt's log-probabilities, which "
                          "are not returned; ask without 'echo'")
        return logprobs
    best_of: Annotated[Optional[Positive], _not_asked("'best_of' must be 1: one completion is made per request", 1)] = None
    suffix: Annotated[Optional[str], _not_asked("'suffix' is not supported: no text is inserted before a suffix", "")] = None


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


# -- Anthropic Messages -----------------------------------------------------------------
class TextBlock(Body):
    type: Literal["text"]
    text: str


class UnsupportedBlock(Body):
    """Any other block, refused with a reason."""
    type: str

    @model_validator(mode="after")
    def _refuse_kind(self) -> "UnsupportedBlock":
        if self.type in ("image", "document", "search_result"):
            raise _refuse(f"'{self.type}' blocks are not supported; this model takes text only")
        raise _refuse(f"unsupported content block type '{self.type}'")


ResultPart = Annotated[Union[Annotated[TextBlock, Tag("text")],
                             Annotated[UnsupportedBlock, Tag("other")]], _by_type({"text"})]


class ToolResultBlock(Body):
    type: Literal["tool_result"]
    tool_use_id: NonEmpty
    is_error: bool = False
    content: Union[str, list[ResultPart], None] = None


class ToolUseBlock(Body):
    type: Literal["tool_use"]
    id: str
    name: str
    input: JsonObject = {}


class ThinkingBlock(Body):
    """This daemon never produces them; a client may echo them back."""
    type: Literal["thinking", "redacted_thinking"]


Block = Annotated[Union[Annotated[TextBlock, Tag("text")],
                        Annotated[ToolResultBlock, Tag("tool_result")],
                        Annotated[ToolUseBlock, Tag("tool_use")],
                        Annotated[ThinkingBlock, Tag("thinking")],
                        Annotated[ThinkingBlock, Tag("redacted_thinking")],
                        Annotated[UnsupportedBlock, Tag("other")]],
                  _by_type({"text", "tool_result", "tool_use", "thinking", "redacted_thinking"})]


class AnthropicMessage(Body):
    role: Literal["user", "assistant", "system"]
    content: Union[str, list[Block]]


class AnthropicTool(Body):
    name: NonEmpty
    type: Optional[str] = None
    description: Optional[str] = None
    input_schema: JsonObject

    @field_validator("type")
    @classmethod
    def _custom_only(cls, kind: str | None) -> str | None:
        if kind not in (None, "custom"):
            raise _refuse(f"server tools ('{kind}') are not supported; define the tool with "
                          "an input_schema")
        return kind


class AnthropicToolChoice(Body):
    """"any" and "tool" cannot be forced without constrained decoding: they act like "auto"."""
    type: Literal["auto", "any", "tool", "none"]
    name: Optional[str] = None

    @model_validator(mode="after")
    def _tool_is_named(self) -> "AnthropicToolChoice":
        if self.type == "tool" and self.name is None:
            raise _refuse("a 'tool' choice needs the tool's 'name'")
        return self


class CountTokensRequest(Body):
    model: str
    messages: Annotated[list[AnthropicMessage], Field(min_length=1)]
    system: Union[str, list[TextBlock], None] = None
    tools: Optional[list[AnthropicTool]] = None
    tool_choice: Optional[AnthropicToolChoice] = None

    @model_validator(mode="after")
    def _choice_among_tools(self) -> "CountTokensRequest":
        """As Anthropic's API: a choice of "any" or of one tool needs tools, and that one among them."""
        choice, names = self.tool_choice, {tool.name for tool in self.tools or []}
        if choice is not None and choice.type in ("any", "tool") and not names:
            raise _refuse(f"tool_choice: '{choice.type}' needs 'tools'")
        if choice is not None and choice.type == "tool" and choice.name not in names:
            raise _refuse(f"tool_choice: no tool named '{choice.name}' in 'tools'")
        return self


class MessagesRequest(CountTokensRequest):
    max_tokens: Positive
    temperature: Unit = 1.0
    top_p: Unit = 1.0
    top_k: Optional[Annotated[int, Field(ge=0)]] = None  # accepted; the sampler has no top-k
    metadata: Optional[JsonObject] = None
    stop_sequences: list[NonEmpty] = []
    stream: bool = False


# -- OpenAI Responses -------------------------------------------------------------------
class InputText(Body):
    type: Literal["input_text", "output_text", "text"]
    text: str


class RefusalPart(Body):
    type: Literal["refusal"]
    refusal: Optional[str] = None


class UnsupportedPart(Body):
    type: Optional[str] = None

    @model_validator(mode="after")
    def _refuse_kind(self) -> "UnsupportedPart":
        if self.type in ("input_image", "input_file", "input_audio"):
            raise _refuse(f"'{self.type}' parts are not supported; this model takes text only")
        raise _refuse("each content part needs a 'type' of input_text or output_text and a "
                      "string 'text'")


_TEXTS = {"input_text", "output_text", "text"}
Part = Annotated[Union[Annotated[InputText, Tag("input_text")], Annotated[InputText, Tag("output_text")],
                       Annotated[InputText, Tag("text")], Annotated[RefusalPart, Tag("refusal")],
                       Annotated[UnsupportedPart, Tag("other")]],
                 _by_type(_TEXTS | {"refusal"})]
Parts = Union[str, list[Part]]


class MessageItem(Body):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Parts


class FunctionCallItem(Body):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str = ""

    @field_validator("arguments")
    @classmethod
    def _is_json_object(cls, arguments: str) -> str:
        if arguments.strip():
            strict_json(arguments, "'arguments'", "'arguments' must be a JSON object encoded as a string")
        return arguments


class FunctionCallOutputItem(Body):
    type: Literal["function_call_output"]
    call_id: str
    output: Parts


class ReasoningItem(Body):
    """This daemon never produces them; a client may send them back."""
    type: Literal["reasoning"]


class UnsupportedItem(Body):
    type: str

    @field_validator("type")
    @classmethod
    def _refuse_kind(cls, kind: str) -> str:
        raise _refuse(f"input items of type '{kind}' are not supported")


_ITEMS = {"message", "function_call", "function_call_output", "reasoning"}
InputItem = Annotated[Union[Annotated[MessageItem, Tag("message")],
                            Annotated[FunctionCallItem, Tag("function_call")],
                            Annotated[FunctionCallOutputItem, Tag("function_call_output")],
                            Annotated[ReasoningItem, Tag("reasoning")],
                            Annotated[UnsupportedItem, Tag("other")]],
                      _by_type(_ITEMS, default="message")]


class FunctionTool(Body):
    type: Literal["function"]
    name: NonEmpty
    description: Optional[str] = None
    parameters: Optional[JsonObject] = None
    strict: Optional[bool] = None


class OtherTool(Body):
    """A built-in tool (web_search, ...): echoed, not offered to the model."""
    model_config = ConfigDict(extra="allow")
    type: str


class NamespaceTool(OtherTool):
    """Function tools grouped under a name (Codex sends them)."""
    type: Literal["namespace"]
    name: Any = None
    tools: list[Annotated[Union[Annotated[FunctionTool, Tag("function")],
                                Annotated[Any, Tag("other")]], _by_type({"function"})]] = []


ResponsesTool = Annotated[Union[Annotated[FunctionTool, Tag("function")],
                                Annotated[NamespaceTool, Tag("namespace")],
                                Annotated[OtherTool, Tag("other")]],
                          _by_type({"function", "namespace"})]


class FunctionChoice(Body):
    type: Literal["function"]
    name: str


def _function_names(tools: list) -> set[str]:
    """The functions a Responses request offers: its function tools, and those its `namespace`
    tools group (routes/responses.parse_tools offers both)."""
    names = {tool.name for tool in tools if isinstance(tool, FunctionTool)}
    for tool in tools:
        if isinstance(tool, NamespaceTool):
            names |= {inner.name for inner in tool.tools if isinstance(inner, FunctionTool)}
    return names


class ResponsesRequest(Body):
    model: str
    input: Union[str, list[InputItem]]
    instructions: Optional[str] = None
    max_output_tokens: Optional[Positive] = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Unit = 1.0
    tools: list[ResponsesTool] = []
    tool_choice: Union[Literal["auto", "none", "required"], FunctionChoice] = "auto"
    parallel_tool_calls: bool = True
    previous_response_id: Optional[str] = None
    store: bool = True
    metadata: Optional[JsonObject] = None
    stream: bool = False
    include: Optional[list[str]] = None  # of OpenAI's extras only the output's logprobs exist here
    top_logprobs: Optional[Annotated[int, Field(ge=0, le=20)]] = None

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_tools(cls, choice: Any, info: ValidationInfo) -> Any:
        if "tools" not in info.data:  # the tools were refused themselves: that error is the one
            return choice
        if choice == "required" and info.data["tools"]:
            return choice  # built-in tools only: agents send them; they are not offered here
        named = choice.name if isinstance(choice, FunctionChoice) else None
        return _among_tools(choice, named, _function_names(info.data["tools"]))

    @property
    def logprobs_asked(self) -> int | None:
        """How many alternatives each token's entry lists, or None: the output's log-probabilities
        are sent only where `include` names them, as on OpenAI's API."""
        return (self.top_logprobs or 0) if "message.output_text.logprobs" in (self.include or []) else None


# -- routes -> bodies, errors -----------------------------------------------------------
POST_BODIES: dict[str, type[Body]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/responses": ResponsesRequest,
    "/v1/messages": MessagesRequest,
    "/v1/messages/count_tokens": CountTokensRequest,
    "/cache/warm": WarmRequest,
    "/cache/pin": PinRequest,
    "/cache/unpin": PinRequest,
}


def strict_json(text: str, what: str, message: str | None = None) -> Any:
    """JSON inside a string field, read as strictly as the body (strict_json.parse_json)."""
    try:
        return parse_json(text, what)
    except ApiError as exc:
        raise PydanticCustomError("json_invalid", message or exc.message) from None
