"""The bodies of OpenAI's Chat Completions (/v1/chat/completions) and legacy completions
(/v1/completions) as pydantic models (the shared base: daemon/bodies.py)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Field, ValidationInfo, WrapValidator, field_validator

from .bodies import MAX_SEED, Body, JsonObject, NonEmpty, Positive, Sent, Unit, among_tools, refuse, strict_json


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
            raise refuse(refusal)
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
        return among_tools(choice, _chat_choice_name(choice), {tool["function"]["name"] for tool in tools})

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top and not info.data.get("logprobs"):
            raise refuse("'top_logprobs' needs 'logprobs': true")
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
        raise refuse("a 'function' choice needs the function's name ('function.name')")
    return name



class CompletionRequest(OpenAISampling):
    prompt: str
    echo: bool = False  # the prompt's text before the completion's, as the API has it
    logprobs: Optional[Annotated[int, Field(ge=0, le=5)]] = None

    @field_validator("logprobs")
    @classmethod
    def _not_of_the_prompt(cls, logprobs: int | None, info: ValidationInfo) -> int | None:
        if logprobs is not None and info.data.get("echo"):  # a cached prefix has no logits to give
            raise refuse("'logprobs' with 'echo' asks for the prompt's log-probabilities, which "
                         "are not returned; ask without 'echo'")
        return logprobs
    best_of: Annotated[Optional[Positive], _not_asked("'best_of' must be 1: one completion is made per request", 1)] = None
    suffix: Annotated[Optional[str], _not_asked("'suffix' is not supported: no text is inserted before a suffix", "")] = None

