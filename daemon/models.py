"""The models a daemon serves and the policy over them: which one loads, which ones unload to
make room under the memory budget (weights and hot KV of every loaded model), and when an
idle one has been kept long enough.

The worker (daemon/worker.py) owns the ServedModels and runs the loads and unloads on the
MLX thread; this module only decides. Requests are served in arrival order across models
when memory is short: a model waiting for room holds back later requests of the models in
its way, so that they drain and one of them can be unloaded.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from kvtier.chunking import PrefillChunk
from kvtier.config import ModelSpec, format_size
from kvtier.engine import Engine
from kvtier.exactness import Exactness
from kvtier.scheduler import ONE_AT_A_TIME, BatchStats, Scheduler

# A model's state, as /v1/models and /health show it.
UNLOADED, LOADING, LOADED, FAILED = "unloaded", "loading", "loaded", "failed"


class ModelTooLarge(Exception):
    """The model's weights (with the pinned models' beside them) do not fit the memory budget."""


@dataclass
class Job:
    """A request or a call (fn(engine)) waiting for its model, with its place in arrival order."""

    work: Any  # a GenerationRequest, or a Callable[[Engine], object]
    emit: Callable[[object], None]
    seq: int


@dataclass
class ServedModel:
    spec: ModelSpec
    state: str = UNLOADED
    # Kept after an unload (its weights are released): routes still render prompts with its
    # tokenizer; a request for it loads it again.
    engine: Engine | None = None
    scheduler: Scheduler | None = None
    mode: str = ONE_AT_A_TIME
    batching: Exactness | None = None  # measured at the first load, kept across reloads
    measure_when_idle: bool = False  # batching's probe left for the daemon's idle time
    prefill_chunk: PrefillChunk | None = None  # timed at the first load, kept across reloads
    backlog: deque[Job] = field(default_factory=deque)  # waiting for room in its scheduler, or its load
    last_used: float = 0.0
    weight_bytes: int = 0  # the safetensors files' size until loaded, then the arrays'
    load_error: str | None = None
    load_seconds: float | None = None
    loads: int = 0
    phase: str | None = None  # what the load is doing now
    stats: BatchStats = field(default_factory=BatchStats)  # token rates, kept across reloads

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def loaded(self) -> bool:
        return self.state == LOADED

    @property
    def running(self) -> bool:
        """Requests in its scheduler (prefilling or decoding)."""
        return self.scheduler is not None and not self.scheduler.idle

    def hot_bytes(self) -> int:
        if not self.loaded or self.engine is None:
            return 0
        return self.engine.store.hot_bytes()

    def footprint(self) -> int:
        """Bytes it holds in memory: weights and hot KV."""
        return self.weight_bytes + self.hot_bytes() if self.loaded else 0

    def first_waiting(self) -> int | None:
        return self.backlog[0].seq if self.backlog else None

    def describe(self) -> dict:
        return {"name": self.name, "source": self.spec.source, "state": self.state,
                "aliases": self.spec.aliases, "pinned": self.spec.pin,
                "weight_bytes": self.weight_bytes, "hot_bytes": self.hot_bytes(),
                "loads": self.loads, "load_seconds": self.load_seconds, "phase": self.phase,
                "error": self.load_error, "waiting": len(self.backlog),
                "prefill_chunk": self.prefill_chunk.describe() if self.prefill_chunk is not None else None,
                "running": len(self.scheduler) if self.scheduler is not None else 0,
                "idle_seconds": round(time.monotonic() - self.last_used, 1) if self.last_used else None}


@dataclass
class Room:
    """What loading a model needs: the models to unload first, or to wait for (busy ones)."""

    unload: list[ServedModel]
    wait_for: list[ServedModel]


def room_for(model: ServedModel, others: list[ServedModel], budget: int, before: int) -> Room:
    """The least recently used idle, unpinned loaded models to unload so that `model`'s
    weights fit the budget beside the rest, or the busy models it must wait for. Idle: nothing
    running and no request that arrived before `before` (the waiting model's first) queued.
    ModelTooLarge when it could not fit even with every unpinned model unloaded."""
    loaded = [m for m in others if m.loaded]
    pinned = sum(m.footprint() for m in loaded if m.spec.pin)
    if model.weight_bytes + pinned > budget:
        beside = f" beside {format_size(pinned)} of pinned models" if pinned else ""
        raise ModelTooLarge(f"model '{model.name}' needs {format_size(model.weight_bytes)} of weights{beside}; "
                            f"the memory budget is {format_size(budget)} (--memory-budget)")
    used = sum(m.footprint() for m in loaded)
    unload: list[ServedModel] = []
    unpinned = sorted((m for m in loaded if not m.spec.pin), key=lambda m: m.last_used)
    idle = [m for m in unpinned if _idle_before(m, before)]
    for candidate in idle:
        if model.weight_bytes + used <= budget:
            break
        unload.append(candidate)
        used -= candidate.footprint()
    if model.weight_bytes + used <= budget:
        return Room(unload, [])
    return Room([], [m for m in unpinned if m not in idle])


def _idle_before(model: ServedModel, before: int) -> bool:
    first = model.first_waiting()
    return not model.running and (first is None or first > before)


def expired(models: list[ServedModel], keep_alive: float | None, now: float) -> list[ServedModel]:
    """Loaded, unpinned models idle (nothing running or queued) for longer than the keep-alive."""
    if keep_alive is None:
        return []
    return [m for m in models if m.loaded and not m.spec.pin and not m.running and not m.backlog
            and now - m.last_used > keep_alive]
