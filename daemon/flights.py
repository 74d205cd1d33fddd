"""The requests the daemon is serving now, each with its phase (waiting, restoring,
prefilling, decoding) and decode rate: what the status page lists (GET /status)."""

from __future__ import annotations

import itertools
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from kvtier.requests import GenerationRequest

WAITING, DECODING = "waiting", "decoding"  # the engine tells "restoring" and "prefilling" between


@dataclass
class Flight:
    id: int
    model: str
    prompt_tokens: int
    phase: str = WAITING
    cached_tokens: int | None = None  # known once its prefix is restored
    chunks: int = 0  # pieces of text decoded: one per token
    started: float = field(default_factory=time.monotonic)
    decoding_since: float | None = None

    def as_json(self) -> dict:
        now = time.monotonic()
        decoding = now - self.decoding_since if self.decoding_since is not None else 0.0
        return {"id": self.id, "model": self.model, "phase": self.phase, "prompt_tokens": self.prompt_tokens,
                "cached_tokens": self.cached_tokens, "completion_tokens": self.chunks,
                "seconds": round(now - self.started, 3),
                "tokens_per_second": round(self.chunks / decoding, 1) if decoding > 0.05 else None}


class Flights:
    """Written from the event loop and (phases) the MLX thread: single attribute stores."""

    def __init__(self) -> None:
        self._flying: dict[int, Flight] = {}
        self._ids = itertools.count(1)

    @contextmanager
    def track(self, request: GenerationRequest, model: str) -> Iterator[Flight]:
        flight = Flight(next(self._ids), model, len(request.prompt_tokens))
        told = request.phase

        def phase(name: str, restored: int) -> None:
            flight.phase = name
            if name != "restoring":
                flight.cached_tokens = restored
            if told:
                told(name, restored)

        request.phase = phase
        self._flying[flight.id] = flight
        try:
            yield flight
        finally:
            del self._flying[flight.id]

    def as_json(self) -> list[dict]:
        return [flight.as_json() for flight in list(self._flying.values())]


def decoded(flight: Flight) -> None:
    """A chunk of text arrived: the request is decoding."""
    if flight.decoding_since is None:
        flight.phase, flight.decoding_since = DECODING, time.monotonic()
    flight.chunks += 1
