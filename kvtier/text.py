"""Generated tokens to text chunks, with the rules every decode path shares: EOS, stop strings,
max_tokens, cancellation, and each token's log-probability where the request asks for them."""

from __future__ import annotations

from typing import Any, Callable

import mlx.core as mx

from .requests import Chunk, GenerationRequest, TokenLogprob, Usage
from .stops import StopMatcher


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE vocabularies (GPT-2's) spell each byte as one printable character:
    printable Latin-1 bytes as themselves, the others as the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


BYTE_OF = _byte_level_alphabet()
SPM_SPACE = "\u2581".encode()


def token_bytes(tokenizer: Any, detokenizer: Any, token: int) -> bytes:
    """A token's own bytes, from the vocabulary mlx-lm's detokenizer reads (a token may hold
    part of a character: its text alone would be a replacement character)."""
    tokenmap = getattr(detokenizer, "tokenmap", None)
    if tokenmap is not None and 0 <= token < len(tokenmap):
        piece = tokenmap[token]
        if isinstance(piece, bytes):  # sentencepiece: its word mark is a space
            return piece.replace(SPM_SPACE, b" ")
        if isinstance(piece, str) and all(c in BYTE_OF for c in piece):  # byte-level BPE
            return bytes(BYTE_OF[c] for c in piece)
    return tokenizer.decode([token]).encode()


def token_logprob(spell: Callable[[int], bytes], logprobs: mx.array, token: int, top: int) -> TokenLogprob:
    """`token`'s entry from the log-probabilities its step computed (the vocabulary's row)."""
    row = logprobs.reshape(-1)
    alternatives: list[tuple[bytes, float]] = []
    top = min(top, row.size)
    if top > 0:
        ids = mx.argpartition(-row, kth=top - 1)[:top]
        ranked = sorted(zip(ids.tolist(), row[ids].tolist()), key=lambda pair: -pair[1])
        alternatives = [(spell(i), value) for i, value in ranked]
    return TokenLogprob(spell(token), row[token].item(), alternatives)


class TextStream:
    """One request's tokens in, its text chunks out."""

    def __init__(self, tokenizer: Any, request: GenerationRequest, usage: Usage,
                 on_cancel: Callable[[], None]):
        self.request, self.usage, self.tokenizer = request, usage, tokenizer
        self.on_cancel = on_cancel
        self.detokenizer = tokenizer.detokenizer
        self.detokenizer.reset()
        self.stops = StopMatcher(request.stop)
        self.eos = set(tokenizer.eos_token_ids)
        self.finish: str | None = None
        self.matched_stop = False
        self.count = 0
        self._started = False  # whether a chunk went out yet
        self._logprobs: list[TokenLogprob] = []  # of tokens whose text is not out yet

    def feed(self, token: int, logprobs: mx.array | None = None) -> list[Chunk]:
        """A generated token (and the log-probabilities of its step); the text now safe to send."""
        self.count += 1
        if token in self.eos:
            self.finish = "stop"
            return []
        self.usage.completion_tokens += 1
        if self.request.logprobs is not None and logprobs is not None:
            self._logprobs.append(token_logprob(self._spell, logprobs, token, self.request.logprobs))
        self.detokenizer.add_token(token)
        text, self.matched_stop = self.stops.feed(self.detokenizer.last_segment)
        if self.matched_stop:
            self.finish = "stop"
        elif self.request.cancelled.is_set():
            self.cancel()
        elif self.request.max_tokens is not None and self.count >= self.request.max_tokens:
            self.finish = "length"
        return [self._chunk(text)] if text else []

    def _spell(self, token: int) -> bytes:
        return token_bytes(self.tokenizer, self.detokenizer, token)

    def cancel(self) -> None:
        self.finish = "cancelled"
        self.on_cancel()

    def close(self) -> Chunk:
        """The last chunk: the text held back, the finish reason, the usage."""
        tail = ""
        if not self.matched_stop:
            self.detokenizer.finalize()
            tail, self.matched_stop = self.stops.feed(self.detokenizer.last_segment)
            tail += "" if self.matched_stop else self.stops.flush()
        chunk = self._chunk(tail)
        chunk.finish_reason, chunk.usage, chunk.stop_sequence = self.finish or "length", self.usage, self.stops.matched
        return chunk

    def _chunk(self, text: str) -> Chunk:
        chunk, self._logprobs = Chunk(text, logprobs=self._logprobs), []
        if not self._started:
            self._started, chunk.cached_tokens = True, self.usage.cached_tokens
        return chunk
