"""Refusing a prompt too long for the context without tokenizing all of it: a 32 MB prompt
took the tokenizer 28 s and 4.9 GB only to be refused for its length.

A text of more than WINDOW_CHARS_PER_TOKEN characters per token of the limit is tokenized
a prefix at a time (the prefix doubling each time) until the tokens the prefix surely
shares with the whole text are more than the limit, or the prefix would be the whole text
(then the caller tokenizes it, as before). Tokenizing is local: cutting the text changes
only the tokens near the cut, so those ending within CUT_MARGIN characters of it are not
counted. A text the limit admits is never refused, and at worst tokenized about twice over.
"""

from __future__ import annotations

from typing import Any

from .tokcache import _fast_tokenizer

# Prose and code run 3-5 characters per token: a text this long is likely over the limit.
WINDOW_CHARS_PER_TOKEN = 8
CUT_MARGIN = 1024  # characters before a cut whose tokens are not counted
CUT_MARGIN_TOKENS = 256  # the same, for a tokenizer that gives no offsets


class PromptTooLong(Exception):
    def __init__(self, at_least: int, limit: int):
        super().__init__(f"the prompt has more than {at_least - 1} tokens; the limit is {limit}")
        self.at_least, self.limit = at_least, limit


def check_fits(tokenizer: Any, text: str, limit: int | None) -> None:
    """Raise PromptTooLong if `text` surely has more than `limit` tokens, tokenizing only a
    prefix to find out; return without a word when it may fit (the caller tokenizes it)."""
    if limit is None:
        return
    size = WINDOW_CHARS_PER_TOKEN * (limit + 1)
    while size < len(text):
        count = _tokens_before_cut(tokenizer, text[:size])
        if count > limit:
            raise PromptTooLong(count, limit)
        size *= 2


def _tokens_before_cut(tokenizer: Any, prefix: str) -> int:
    """Tokens of `prefix` that end far enough before its end to be the whole text's too."""
    fast = _fast_tokenizer(tokenizer)
    if fast is None:
        return len(tokenizer.encode(prefix, add_special_tokens=False)) - CUT_MARGIN_TOKENS
    offsets = fast.backend_tokenizer.encode(prefix, add_special_tokens=False).offsets
    bound = len(prefix) - CUT_MARGIN
    return sum(1 for _, end in offsets if end <= bound)
