"""A request's prompt as tokens: the model's chat template rendered and tokenized, and where
its messages end (the snapshot points of recurrent layers). Nothing here runs MLX: the routes
call it on the event loop's thread pool, before the request reaches the MLX thread."""

from __future__ import annotations

from typing import Any

import numpy as np
from jinja2 import TemplateError

from .blocks import common_prefix
from .prompt_bound import WINDOW_CHARS_PER_TOKEN, check_fits
from .tokcache import IncrementalTokenizer, common_prefix_length


def fold_system_messages(messages: list[dict]) -> list[dict]:
    """Messages for a chat template that takes a system message only first: each later system
    message is appended to the user message before it, else put before the next user message,
    else becomes a user message of its own."""
    out: list[dict] = []
    pending: list[str] = []  # system texts waiting for the next user message
    for i, message in enumerate(messages):
        if message["role"] == "system" and i > 0:
            if out and out[-1]["role"] == "user" and isinstance(out[-1]["content"], str):
                out[-1] = dict(out[-1], content=f"{out[-1]['content']}\n\n{message['content']}")
            else:
                pending.append(message["content"])
            continue
        if pending and message["role"] == "user" and isinstance(message["content"], str):
            message = dict(message, content="\n\n".join([*pending, message["content"]]))
            pending = []
        out.append(message)
    out.extend({"role": "user", "content": text} for text in pending)
    return out


def _may_be_long(messages: list[dict], limit: int) -> bool:
    """Whether the messages' text is long enough to be worth rendering twice to check it
    (a tokenizer tokenized whole renders and tokenizes in one call)."""
    chars = sum(len(m["content"]) if isinstance(m.get("content"), str) else len(str(m.get("content")))
                for m in messages)
    return chars > WINDOW_CHARS_PER_TOKEN * limit


class Renderer:
    """Prompts for one model's tokenizer (mlx-lm's TokenizerWrapper). `boundaries`: whether
    message ends are worth finding (only models with snapshot layers use them). A fast
    tokenizer tokenizes only what is new since a recent prompt (kvtier.tokcache)."""

    def __init__(self, tokenizer: Any, boundaries: bool):
        self.tokenizer = tokenizer
        self.boundaries = boundaries
        self.incremental = IncrementalTokenizer.of(tokenizer)  # None: each prompt tokenized whole

    def render(self, messages: list[dict], tools: list[dict] | None = None,
               prefill: str = "", limit: int | None = None) -> tuple[list[int], list[int]]:
        """The prompt's tokens (a `prefill` the answer continues after the generation prompt)
        and its message ends; PromptTooLong if it surely has more than `limit` tokens."""
        check_fits(self.tokenizer, prefill, limit)
        tokens, text = self._chat(messages, tools, limit)
        boundaries = self.message_boundaries(messages, tools, tokens, text)
        if prefill:
            tokens = tokens + list(self.tokenizer.encode(prefill, add_special_tokens=False))
        return tokens, boundaries

    def chat_tokens(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        return self._chat(messages, tools, None)[0]

    def _chat(self, messages: list[dict], tools: list[dict] | None,
              limit: int | None) -> tuple[list[int], str | None]:
        """The prompt's tokens, and its text when it was rendered as text first."""
        if self.incremental is None and limit is not None and _may_be_long(messages, limit):
            check_fits(self.tokenizer, self._template(messages, tools, True, tokenize=False), limit)
        if self.incremental is not None:
            text = self._template(messages, tools, add_generation_prompt=True, tokenize=False)
            check_fits(self.tokenizer, text, limit)
            encoded = self.incremental.encode(text)
            if encoded is not None:
                return list(encoded.ids), text
        return self._template(messages, tools, add_generation_prompt=True), None

    def remember(self, sequences: list[list[int]]) -> int:
        """Tokenize the texts of these token sequences (oldest first) ahead of the prompts
        that will extend them; how many were kept (0 without incremental tokenizing)."""
        if self.incremental is None:
            return 0
        for tokens in sequences:
            self.incremental.remember(tokens)
        return len(sequences)

    def stats(self) -> dict:
        """Whether prompts are tokenized incrementally, and the tokens reused and tokenized."""
        incremental = self.incremental
        return {"incremental": incremental is not None,
                "tokens_reused": incremental.tokens_reused if incremental else 0,
                "tokens_tokenized": incremental.tokens_tokenized if incremental else 0}

    def text_tokens(self, prompt: str, limit: int | None = None) -> list[int]:
        check_fits(self.tokenizer, prompt, limit)
        return list(self.tokenizer.encode(prompt))

    def message_boundaries(self, messages: list[dict], tools: list[dict] | None,
                           tokens: list[int], full: str | None = None) -> list[int]:
        """Where the system prompt and the last few messages end in `tokens` (rendered as
        `full`, if given): the points a later request most likely shares, worth a snapshot
        for recurrent layers."""
        if not self.boundaries:
            return []
        counts = sorted({1, *range(max(1, len(messages) - 3), len(messages) + 1)})
        if full is None:
            full = self._template(messages, tools, add_generation_prompt=True, tokenize=False)
        ends_in_text = self.token_ends(full, tokens)
        ends = []
        for count in counts:
            if ends_in_text is not None:  # text renders are cheap; tokenizing a long prompt is not
                partial = self._template(messages[:count], tools, add_generation_prompt=False, tokenize=False)
                ends.append(int(np.searchsorted(ends_in_text, common_prefix_length(partial, full), side="right")))
            else:
                partial = self._template(messages[:count], tools, add_generation_prompt=False)
                ends.append(common_prefix(np.asarray(partial), np.asarray(tokens)))
        return sorted(set(e for e in ends if e > 0))

    def token_ends(self, text: str, tokens: list[int]) -> np.ndarray | None:
        """Where each of `tokens` ends in `text` (characters), from one tokenization with
        offsets (the prompt's own, when it was tokenized incrementally); None when the
        tokenizer gives no offsets or tokenizes `text` otherwise."""
        encoded = self.incremental.encode(text) if self.incremental is not None else None
        if encoded is not None:
            ids, ends = encoded.ids, np.frombuffer(encoded.ends, dtype=np.int64)
            ends.flags.writeable = False  # a view of the tokenizer's cache
        else:
            try:  # the Hugging Face fast tokenizer's own (Rust) tokenizer: it gives offsets
                encoding = self.tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
                ids, ends = encoding.ids, np.array([end for _, end in encoding.offsets], dtype=np.int64)
            except (AttributeError, KeyError, TypeError, NotImplementedError, ValueError):
                return None
        if len(ids) != len(tokens) or list(ids) != list(tokens) or np.any(np.diff(ends) < 0):
            return None
        return ends

    def _template(self, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool,
                  tokenize: bool = True) -> Any:
        kwargs = {"tools": tools} if tools else {}

        def apply(messages: list[dict]) -> Any:
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=tokenize, **kwargs)

        try:
            rendered = apply(messages)
        except TemplateError:
            folded = fold_system_messages(messages)
            if folded == messages:
                raise
            # Templates such as Qwen's refuse a system message after the first one.
            rendered = apply(folded)
        return list(rendered) if tokenize else rendered
