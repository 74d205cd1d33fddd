"""The bodies of Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens) as
pydantic models (the shared base: daemon/bodies.py)."""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import Field, Tag, field_validator, model_validator

from .bodies import Body, JsonObject, NonEmpty, Positive, Unit, by_type, refuse


class TextBlock(Body):
    type: Literal["text"]
    text: str


class UnsupportedBlock(Body):
    """Any other block, refused with a reason."""
    type: str

    @model_validator(mode="after")
    def _refuse_kind(self) -> "UnsupportedBlock":
        if self.type in ("image", "document", "search_result"):
            raise refuse(f"'{self.type}' blocks are not supported; this model takes text only")
        raise refuse(f"unsupported content block type '{self.type}'")


ResultPart = Annotated[Union[Annotated[TextBlock, Tag("text")],
                             Annotated[UnsupportedBlock, Tag("other")]], by_type({"text"})]


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
                  by_type({"text", "tool_result", "tool_use", "thinking", "redacted_thinking"})]


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
            raise refuse(f"server tools ('{kind}') are not supported; define the tool with "
                         "an input_schema")
        return kind


class AnthropicToolChoice(Body):
    """"any" and "tool" cannot be forced without constrained decoding: they act like "auto"."""
    type: Literal["auto", "any", "tool", "none"]
    name: Optional[str] = None

    @model_validator(mode="after")
    def _tool_is_named(self) -> "AnthropicToolChoice":
        if self.type == "tool" and self.name is None:
            raise refuse("a 'tool' choice needs the tool's 'name'")
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
            raise refuse(f"tool_choice: '{choice.type}' needs 'tools'")
        if choice is not None and choice.type == "tool" and choice.name not in names:
            raise refuse(f"tool_choice: no tool named '{choice.name}' in 'tools'")
        return self


class MessagesRequest(CountTokensRequest):
    max_tokens: Positive
    temperature: Unit = 1.0
    top_p: Unit = 1.0
    top_k: Optional[Annotated[int, Field(ge=0)]] = None  # accepted; the sampler has no top-k
    metadata: Optional[JsonObject] = None
    stop_sequences: list[NonEmpty] = []
    stream: bool = False

