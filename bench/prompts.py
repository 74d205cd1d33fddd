"""Agent-shaped prompts for the demo and the benchmarks: system prompts full of tool
definitions, the questions asked on them, and a coding-agent session (tool results, retries,
compactions) replayed request by request. All deterministic: every server sees the same text."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Callable

VERBS = ["read", "write", "list", "search", "run", "patch", "format", "lint", "test", "fetch",
         "diff", "commit", "open", "rename", "delete", "build", "profile", "trace", "review"]
NOUNS = ["file", "directory", "symbol", "test", "command", "branch", "issue", "module", "config",
         "log", "package", "function", "class", "snippet", "workspace", "terminal", "notebook"]

QUESTIONS = ["Find where the block size is configured and explain it.",
             "Run the unit tests and summarise any failure.",
             "Add a --verbose flag to the CLI.",
             "Which module writes files to disk?"]


def messages_for(system: str, question: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


# -- system prompts ------------------------------------------------------------------------
def tool_definitions(count: int, seed: int = 0) -> list[dict]:
    """OpenAI-style tool definitions, deterministic, shaped like a coding agent's."""
    rng = random.Random(seed)
    tools = []
    for i in range(count):
        verb, noun = rng.choice(VERBS), rng.choice(NOUNS)
        params = {f"{rng.choice(NOUNS)}_{j}": {"type": rng.choice(["string", "integer", "boolean"]),
                                               "description": f"The {rng.choice(NOUNS)} to {verb}, "
                                                              f"relative to the {rng.choice(NOUNS)}."}
                  for j in range(rng.randint(2, 4))}
        tools.append({"type": "function", "function": {
            "name": f"{verb}_{noun}_{i}",
            "description": f"{verb.capitalize()} a {noun} in the current {rng.choice(NOUNS)}. "
                           f"Use it when the user asks to {verb} a {noun}; never guess paths.",
            "parameters": {"type": "object", "properties": params, "required": list(params)[:1]}}})
    return tools


def agent_system_prompt(target_tokens: int, tokenizer, project: str = "kvtier", seed: int = 0,
                        step: int = 4) -> str:
    """A system prompt with tool definitions, grown `step` tools at a time until it is about
    `target_tokens` long."""
    head = (f"You are an autonomous coding agent working in the {project} repository. Think step by "
            "step, call tools to inspect files before editing them, and keep answers short.\n"
            "# Tools\n")
    text, count = head, 0
    while len(tokenizer.encode(text)) < target_tokens:
        count += step
        text = head + "\n".join(json.dumps(t) for t in tool_definitions(count, seed))
    return text


# -- an agent trace: the requests of one coding session ------------------------------------
EDIT_EVERY = 8  # a retry or a compaction every this many requests


@dataclass
class TraceRequest:
    label: str
    messages: list[dict]


def _words(rng: random.Random) -> tuple[str, str, str]:
    return rng.choice(VERBS), rng.choice(NOUNS), rng.choice(NOUNS)


def _listing_line(rng: random.Random) -> str:
    verb, noun, other = _words(rng)
    return (f"-rw-r--r--  1 dev  staff  {rng.randint(200, 90000):>6} Nov {rng.randint(1, 28):>2} "
            f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d} src/{noun}/{verb}_{other}.py")


def _test_line(rng: random.Random) -> str:
    verb, noun, other = _words(rng)
    status = rng.choice(["PASSED", "PASSED", "PASSED", "FAILED", "SKIPPED"])
    return f"tests/test_{noun}.py::test_{verb}_{other} {status} [{rng.randint(1, 100):>3}%]"


def _code_line(rng: random.Random) -> str:
    verb, noun, other = _words(rng)
    return (f"    def {verb}_{noun}(self, {other}: int = {rng.randint(0, 99)}) -> "
            f"{rng.choice(['int', 'str', 'bool', 'None'])}:\n"
            f"        return self.{other}_{verb}({other}) + {rng.randint(1, 9)}")


def _grep_line(rng: random.Random) -> str:
    verb, noun, other = _words(rng)
    return (f"src/{noun}/{verb}.py:{rng.randint(1, 900)}:    {other} = {verb}_{noun}({other}, "
            f"strict={rng.choice(['True', 'False'])})")


TOOL_OUTPUTS: list[Callable[[random.Random], str]] = [_listing_line, _test_line, _code_line, _grep_line]


def tool_output(rng: random.Random, tokenizer) -> str:
    """A few hundred tokens of deterministic tool output: a listing, tests, code or grep hits."""
    make, target = rng.choice(TOOL_OUTPUTS), rng.randint(150, 400)
    lines: list[str] = []
    while len(tokenizer.encode("\n".join(lines))) < target:
        lines += [make(rng) for _ in range(4)]
    return "\n".join(lines)


def tool_call(rng: random.Random, prefix: str = "Let me") -> dict:
    verb, noun, other = _words(rng)
    args = json.dumps({f"{other}_0": f"src/{noun}/{verb}.py", "limit": rng.randint(10, 200)})
    return {"role": "assistant", "content": f"{prefix} {verb} the {noun}: calling `{verb}_{noun}` with {args}."}


def edit(messages: list[dict], number: int, rng: random.Random, tokenizer) -> tuple[str, list[dict]]:
    """Invalidate a suffix like an agent does: odd edits retry (drop the last two tool rounds
    and redo one differently), even edits compact (summarise everything after the task)."""
    if number % 2:
        kept = messages[:max(2, len(messages) - 4)]
        return "retry", kept + [tool_call(rng, "Retrying differently, I will"),
                                {"role": "tool", "content": tool_output(rng, tokenizer)}]
    verb, noun, other = _words(rng)
    summary = (f"Summary of the work so far: we inspected the {noun} and {other} modules, "
               f"changed how they {verb} data, and ran the tests; {rng.randint(1, 9)} still fail. "
               "Continue from here.")
    return "compaction", messages[:2] + [{"role": "user", "content": summary}]


def build_trace(system: str, tokenizer, count: int, seed: int = 11) -> list[TraceRequest]:
    """A coding-agent session: task, then tool calls with their results, a user nudge now and
    then, and every EDIT_EVERY requests an edit of the suffix. Fixed, so every server (and the
    no-cache baseline) sees exactly the same message lists."""
    rng = random.Random(seed)
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": "The checkout tests fail after the refactor; find out why and fix it."}]
    trace = [TraceRequest("first request", list(messages))]
    for i in range(1, count):
        if i % EDIT_EVERY == 0:
            label, messages = edit(messages, i // EDIT_EVERY, rng, tokenizer)
        else:
            label = "tool result"
            messages = messages + [tool_call(rng), {"role": "tool", "content": tool_output(rng, tokenizer)}]
            if i % 5 == 3:
                verb, noun, _ = _words(rng)
                label, messages = "user turn", messages + [
                    {"role": "user", "content": f"Good. Now {verb} the {noun} too and keep the tests green."}]
        trace.append(TraceRequest(label, list(messages)))
    return trace
