"""How many tokens an answer may have, and the two APIs' policies for a prompt that leaves
the context too little room: OpenAI refuses a request whose prompt and asked-for tokens do
not fit; Anthropic's Messages and the Responses API answer up to the context's end."""

from __future__ import annotations

from dataclasses import dataclass

from ..state import DaemonState


@dataclass
class Budget:
    """The most tokens an answer may have, and which limit set it ("request", "ceiling" or
    "context"); tokens None: no limit at all, the answer runs until the model ends it."""
    tokens: int | None
    limited_by: str | None


class NoRoom(Exception):
    """The prompt leaves the answer no room, or less than it asks (OpenAI), in the context;
    each route words its API's refusal."""

    def __init__(self, limit: int, prompt_tokens: int, asked: int | None):
        super().__init__(f"context {limit}, prompt {prompt_tokens}, asked {asked}")
        self.limit, self.prompt_tokens, self.asked = limit, prompt_tokens, asked


def completion_budget(state: DaemonState, prompt_tokens: int, asked: int | None) -> Budget:
    """The least of the request's limit, the operator's `--max-tokens` and the room left in
    the context. A request that names none on a model that declares no context (Mamba2)
    runs until EOS, a stop sequence, or its client leaving (which cancels it)."""
    room = state.context_limit()
    limits = {"request": asked, "ceiling": state.config.max_tokens_ceiling,
              "context": None if room is None else room - prompt_tokens}
    given = {name: n for name, n in limits.items() if n is not None}
    if not given:
        return Budget(None, None)
    least = min(given, key=lambda name: given[name])  # on a tie the request's own limit names it
    return Budget(given[least], least)


def fitting_budget(state: DaemonState, prompt_tokens: int, asked: int | None) -> Budget:
    """OpenAI's policy: the prompt and the tokens asked (at least one) must fit the context,
    else NoRoom. No limit asked: the answer runs until the model stops or the context is full."""
    limit = state.context_limit()
    if limit and prompt_tokens + (asked or 1) > limit:
        raise NoRoom(limit, prompt_tokens, asked)
    return completion_budget(state, prompt_tokens, asked)


def clamped_budget(state: DaemonState, prompt_tokens: int, asked: int | None) -> Budget:
    """Anthropic's and the Responses API's policy: NoRoom only for a prompt that fills the
    context. Agents ask for large budgets (Claude Code: 32000) whatever the model: answered
    up to the end of the context rather than refused (the budget says the context set it)."""
    limit = state.context_limit()
    if limit and prompt_tokens >= limit:
        raise NoRoom(limit, prompt_tokens, asked)
    return completion_budget(state, prompt_tokens, asked)
