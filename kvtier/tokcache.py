"""Exact incremental tokenization of texts that grow, as an agent's conversation does: the
longest recently tokenized prefix that ends where tokenization provably splits keeps its
tokens, and only the rest of the text is tokenized.

Why a cut is exact (Hugging Face `tokenizers`, which fast tokenizers run): encoding first
splits the raw text on the added tokens that are not `normalized`, matched leftmost-longest
(`single_word` matches dropped, `lstrip`/`rstrip` ones widened over whitespace); each piece
between them is then normalized, pre-tokenized and tokenized on its own, and with
`add_special_tokens=False` the post-processor adds no token. So text[:p] and text[p:]
tokenized apart give the whole text's tokens when that first split has a boundary at p in
all three. A cut is made only before an added token whose first character c (a "cut
character") is such that:
- c is ASCII punctuation other than `_`: neither whitespace (an `rstrip` match before p
  stops at it) nor a word character (a `single_word` match ending at p sees the same
  boundary whether the text goes on or not);
- no non-normalized added token has c anywhere but first: no match can span p;
- no non-normalized added token starting with c has `lstrip` or `single_word`: the match at
  p (the longest that starts there) neither reaches back over whitespace before p nor
  depends on the character before it.
Then every occurrence of such a token in a text is a boundary. A recent text's cuts are where
its own tokenization has one starting exactly at its content; a new text is cut at the last
of them whose whole token lies in the prefix the two share. The pre-tokenizer sees the same
pieces (Metaspace's `prepend_scheme="first"` prepends only to a piece at offset 0, and the
rest's first piece is the added token). Anything else (not a fast tokenizer, truncation or
padding set, special tokens encoded as text, a custom or unknown component, BPE dropout)
tokenizes the whole text, as before."""

from __future__ import annotations

import bisect
import json
import string
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

CUT_CHARACTERS = frozenset(string.punctuation) - {"_"}
RECENT_TEXTS = 8  # texts kept: a few conversations (sub-agents, parallel requests) at a time

# Components whose encoding is per piece (custom Python ones cannot be checked: their state
# does not serialize) and post-processors that add nothing with add_special_tokens=False.
PIECEWISE_PRE_TOKENIZERS = frozenset({
    "BertPreTokenizer", "ByteLevel", "CharDelimiterSplit", "Digits", "FixedLength", "Metaspace",
    "Punctuation", "Sequence", "Split", "UnicodeScripts", "Whitespace", "WhitespaceSplit"})
QUIET_POST_PROCESSORS = frozenset({
    "BertProcessing", "ByteLevel", "RobertaProcessing", "Sequence", "TemplateProcessing"})


def common_prefix_length(a: str, b: str) -> int:
    """Length of the longest common prefix, by C-speed comparisons of chunks that double in
    size, then bisection inside the first that differs: O(prefix), where a character loop
    takes milliseconds on a long prompt."""
    shorter, longer = (a, b) if len(a) <= len(b) else (b, a)
    if longer.startswith(shorter):  # the usual case: the last turn's prompt, whole
        return len(shorter)
    low, step = 0, 256
    while True:  # shorter[:low] == longer[:low], and they differ before len(shorter)
        high = min(low + step, len(shorter))
        if not longer.startswith(shorter[low:high], low):
            break
        low, step = high, step * 2
    while high - low > 1:  # the first difference is in [low, high)
        middle = (low + high) // 2
        if longer.startswith(shorter[low:middle], low):
            low = middle
        else:
            high = middle
    return low


@dataclass(frozen=True)
class Encoded:
    """One text's tokens, where each ends in it (characters), and its cuts: (position, token
    index, end of the added token there) wherever the text provably splits. `reused`: tokens
    taken from an earlier text's tokenization."""
    text: str
    ids: tuple[int, ...]
    ends: array
    cuts: tuple[tuple[int, int, int], ...]
    reused: int = 0


class IncrementalTokenizer:
    """Tokenizes like `tokenizer.encode(text, add_special_tokens=False)`, reusing the tokens of
    recent texts that share a prefix with the new one. Thread-safe."""

    def __init__(self, hf_tokenizer: Any, cut_tokens: dict[int, str]):
        self.hf_tokenizer = hf_tokenizer
        self.backend = hf_tokenizer.backend_tokenizer
        self.cut_tokens = cut_tokens  # id -> content of the added tokens a text may be cut before
        self._recent: OrderedDict[str, Encoded] = OrderedDict()
        self._lock = threading.Lock()
        # Of each new text's tokens: those kept from an earlier text's, and those tokenized.
        self.tokens_reused = self.tokens_tokenized = 0

    @classmethod
    def of(cls, tokenizer: Any) -> IncrementalTokenizer | None:
        """One for `tokenizer` (mlx-lm's TokenizerWrapper or a Hugging Face tokenizer), or None
        when its encoding is not the fast tokenizer's own, piece by piece."""
        hf = _fast_tokenizer(tokenizer)
        if hf is None or not _piecewise(hf.backend_tokenizer):
            return None
        try:
            added = hf.backend_tokenizer.get_added_tokens_decoder()
        except AttributeError:  # an older tokenizers: no added tokens' options to check
            return None
        return cls(hf, cut_tokens(added))

    def encode(self, text: str, count: bool = True) -> Encoded | None:
        """`text` tokenized; None when the tokenizer's state (truncation, padding, special
        tokens split) makes its own call differ from a plain encode: tokenize it that way.
        `count` False: not a request's text, not counted in the stats."""
        if not self._plain():
            return None
        with self._lock:
            recent = list(self._recent.values())
        known = next((e for e in recent if e.text == text), None)  # message ends, a retry
        encoded = known or self._extend(text, recent) or self._whole(text)
        with self._lock:
            if known is None and count:
                self.tokens_reused += encoded.reused
                self.tokens_tokenized += len(encoded.ids) - encoded.reused
            self._recent[text] = encoded
            self._recent.move_to_end(text)
            while len(self._recent) > RECENT_TEXTS:
                self._recent.popitem(last=False)
        return encoded

    def remember(self, ids: list[int]) -> None:
        """Keep the text `ids` decode to as a recent text, so that a prompt extending it
        tokenizes only what is new (a restarted daemon's newest conversations). What is kept
        is that text's own tokenization, whatever `ids` were: prompts stay exact."""
        self.encode(self.backend.decode(ids, skip_special_tokens=False), count=False)

    def _plain(self) -> bool:
        backend = self.backend
        return (backend.truncation is None and backend.padding is None
                and not getattr(backend, "encode_special_tokens", False)
                and not getattr(self.hf_tokenizer, "split_special_tokens", False))

    def _whole(self, text: str) -> Encoded:
        ids, ends, cuts = self._tokenize(text)
        return Encoded(text, tuple(ids), ends, tuple(cuts))

    def _extend(self, text: str, recent: list[Encoded]) -> Encoded | None:
        """`text` as the tokens of the recent text it shares the longest cut prefix with, and
        the rest tokenized; None when no recent text has a cut inside the shared prefix."""
        best: tuple[int, int, Encoded] | None = None  # (position, cut number, earlier text)
        for earlier in recent:
            shared = common_prefix_length(earlier.text, text)
            # the last cut whose whole added token lies in the shared prefix: text has it too
            n = bisect.bisect_right(earlier.cuts, shared, key=lambda cut: cut[2])
            if n and (best is None or earlier.cuts[n - 1][0] > best[0]):
                best = (earlier.cuts[n - 1][0], n - 1, earlier)
        if best is None or best[0] == 0:
            return None
        position, number, earlier = best
        tail = text[position:]
        ids, ends, cuts = self._tokenize(tail)
        if not cuts or cuts[0][:2] != (0, 0):  # the tail starts with its added token: by the above, always
            return None
        kept = earlier.cuts[number][1]
        return Encoded(text, earlier.ids[:kept] + tuple(ids),
                       earlier.ends[:kept] + array("q", (end + position for end in ends)),
                       earlier.cuts[:number] + tuple((p + position, i + kept, e + position)
                                                     for p, i, e in cuts),
                       reused=kept)

    def _tokenize(self, text: str) -> tuple[list[int], array, list[tuple[int, int, int]]]:
        encoding = self.backend.encode(text, add_special_tokens=False)
        ids, offsets = encoding.ids, encoding.offsets
        cuts = []
        for index, token in enumerate(ids):
            content = self.cut_tokens.get(token)
            if content is not None and text.startswith(content, offsets[index][0]):
                cuts.append((offsets[index][0], index, offsets[index][0] + len(content)))
        return ids, array("q", (end for _, end in offsets)), cuts


def cut_tokens(added: dict[int, Any]) -> dict[int, str]:
    """The added tokens (id -> content) a text may be cut before: those starting with a cut
    character (see the module's docstring) and matched in the raw text."""
    raw = {i: t for i, t in added.items() if not t.normalized and t.content}
    inner = {character for t in raw.values() for character in t.content[1:]}
    characters = {t.content[0] for t in raw.values()} & (CUT_CHARACTERS - inner)
    characters -= {t.content[0] for t in raw.values() if t.lstrip or t.single_word}
    return {i: t.content for i, t in raw.items() if t.content[0] in characters}


def _fast_tokenizer(tokenizer: Any) -> Any:
    """The Hugging Face fast tokenizer behind `tokenizer`, if its encoding methods are the
    fast tokenizer's own (a subclass may prepare the text first, as CodeLlama's does)."""
    try:
        from transformers import PreTrainedTokenizerFast  # transformers 5: TokenizersBackend
    except ImportError:
        return None
    hf = tokenizer if isinstance(tokenizer, PreTrainedTokenizerFast) else getattr(tokenizer, "_tokenizer", None)
    if not isinstance(hf, PreTrainedTokenizerFast):
        return None
    methods = ("__call__", "_call_one", "encode", "encode_plus", "_encode_plus", "_batch_encode_plus")
    if any(getattr(type(hf), m, None) is not getattr(PreTrainedTokenizerFast, m, None) for m in methods):
        return None
    return hf


def _piecewise(backend: Any) -> bool:
    """Whether `backend` encodes each piece between added tokens on its own and adds nothing."""
    if getattr(backend.model, "dropout", None):
        return False
    try:
        return (_types_within(backend.pre_tokenizer, PIECEWISE_PRE_TOKENIZERS, "pretokenizers")
                and _types_within(backend.post_processor, QUIET_POST_PROCESSORS, "processors")
                and (backend.normalizer is None or bool(backend.normalizer.__getstate__())))
    except Exception:  # a custom (Python) component: its state does not serialize
        return False


def _types_within(component: Any, allowed: frozenset[str], children: str) -> bool:
    if component is None:
        return True

    def check(state: dict) -> bool:
        return state.get("type") in allowed and all(check(c) for c in state.get(children) or [])

    return check(json.loads(component.__getstate__()))
