"""Tool calls shared by the OpenAI and Anthropic routes.

Tools go *into* the prompt through the model's own chat template (HF `tools=` argument, the
OpenAI function shape); tool calls come *out* of the generated text between the tokenizer's
`tool_call_start` / `tool_call_end` markers and are parsed by mlx-lm's tool parser for that
model (`TokenizerWrapper.tool_parser`, inferred from the chat template), as mlx_lm.server does.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("kvtier.tools")


@dataclass
class ToolCall:
    name: str
    arguments: dict | Any  # usually a dict; whatever the parser gave otherwise
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self, index: int | None = None) -> dict:
        out: dict[str, Any] = {"id": self.id, "type": "function",
               "function": {"name": self.name,
                            "arguments": json.dumps(self.arguments, ensure_ascii=False)}}
        if index is not None:
            out["index"] = index
        return out


def supports_tool_calls(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "has_tool_calling", False)
                and getattr(tokenizer, "tool_parser", None) is not None)


def split_tool_calls(text: str, tokenizer: Any, tools: list | None = None) -> tuple[str, list[ToolCall]]:
    """Generated text -> (the text outside tool-call markers, the parsed tool calls).

    A call the parser cannot read (cut off by max_tokens, say) stays in the text, so nothing
    the model wrote is lost. With at least one call, the remaining text is stripped: the chat
    template puts its own newline before each call when the turn is rendered again.
    """
    if not supports_tool_calls(tokenizer):
        return text, []
    start, end = tokenizer.tool_call_start, tokenizer.tool_call_end
    if start not in text:
        return text, []
    kept, calls, position = [], [], 0
    while (opening := text.find(start, position)) >= 0:
        closing = text.find(end, opening + len(start)) if end else -1
        body_end = closing if closing >= 0 else len(text)
        parsed = _parse(tokenizer, text[opening + len(start): body_end], tools)
        if parsed is None:
            break  # unreadable: keep it (and everything after) as text
        kept.append(text[position:opening])
        calls.extend(parsed)
        position = body_end + len(end) if closing >= 0 else len(text)
    kept.append(text[position:])
    rest = "".join(kept)
    return (rest.strip() if calls else rest), calls


def _parse(tokenizer: Any, body: str, tools: list | None) -> list[ToolCall] | None:
    try:
        parsed = tokenizer.tool_parser(body, tools)
    except Exception as exc:  # parsers raise ValueError, JSONDecodeError, KeyError, ...
        log.warning("could not parse a tool call (%s: %s)", type(exc).__name__, exc)
        return None
    items = parsed if isinstance(parsed, list) else [parsed]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            log.warning("tool parser returned %r; keeping the text", item)
            return None
        arguments = item.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except (json.JSONDecodeError, RecursionError):
                pass  # the model's own text: kept as it wrote it
        calls.append(ToolCall(item["name"], arguments, *([item["id"]] if item.get("id") else [])))
    return calls


class ToolCallBuffer:
    """Streaming: pass text through until a tool call may begin, then hold the rest back
    until the end, when `finish` splits it into text and calls."""

    def __init__(self, tokenizer: Any, tools: list | None, enabled: bool = True):
        self.tokenizer, self.tools = tokenizer, tools
        self.marker = tokenizer.tool_call_start if enabled and supports_tool_calls(tokenizer) else None
        self.pending = ""
        self.holding = False

    def feed(self, text: str) -> str:
        """Text safe to emit now."""
        if self.marker is None:
            return text
        self.pending += text
        if self.holding:
            return ""
        at = self.pending.find(self.marker)
        if at >= 0:
            self.holding = True
            out, self.pending = self.pending[:at], self.pending[at:]
            return out
        keep = _partial_suffix(self.pending, self.marker)
        out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(text still to emit, tool calls) at the end of generation."""
        pending, self.pending = self.pending, ""
        if not self.holding:
            return pending, []
        text, calls = split_tool_calls(pending, self.tokenizer, self.tools)
        return text, calls


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
