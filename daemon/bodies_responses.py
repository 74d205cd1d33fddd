"""The body of OpenAI's Responses API (/v1/responses) as pydantic models: input items and
their content parts, tools, the tool choice (the shared base: daemon/bodies.py)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import ConfigDict, Field, Tag, ValidationInfo, field_validator, model_validator

from .bodies import Body, JsonObject, NonEmpty, Positive, Unit, among_tools, by_type, refuse, strict_json


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
            raise refuse(f"'{self.type}' parts are not supported; this model takes text only")
        raise refuse("each content part needs a 'type' of input_text or output_text and a "
                     "string 'text'")


_TEXTS = {"input_text", "output_text", "text"}
Part = Annotated[Union[Annotated[InputText, Tag("input_text")], Annotated[InputText, Tag("output_text")],
                       Annotated[InputText, Tag("text")], Annotated[RefusalPart, Tag("refusal")],
                       Annotated[UnsupportedPart, Tag("other")]],
                 by_type(_TEXTS | {"refusal"})]
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
        raise refuse(f"input items of type '{kind}' are not supported")


_ITEMS = {"message", "function_call", "function_call_output", "reasoning"}
InputItem = Annotated[Union[Annotated[MessageItem, Tag("message")],
                            Annotated[FunctionCallItem, Tag("function_call")],
                            Annotated[FunctionCallOutputItem, Tag("function_call_output")],
                            Annotated[ReasoningItem, Tag("reasoning")],
                            Annotated[UnsupportedItem, Tag("other")]],
                      by_type(_ITEMS, default="message")]


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
                                Annotated[Any, Tag("other")]], by_type({"function"})]] = []


ResponsesTool = Annotated[Union[Annotated[FunctionTool, Tag("function")],
                                Annotated[NamespaceTool, Tag("namespace")],
                                Annotated[OtherTool, Tag("other")]],
                          by_type({"function", "namespace"})]


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
        return among_tools(choice, named, _function_names(info.data["tools"]))

    @property
    def logprobs_asked(self) -> int | None:
        """How many alternatives each token's entry lists, or None: the output's log-probabilities
        are sent only where `include` names them, as on OpenAI's API."""
        return (self.top_logprobs or 0) if "message.output_text.logprobs" in (self.include or []) else None

