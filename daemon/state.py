"""What the aiohttp app shares between routes: settings, the MLX worker, the models' names,
start time; and which model the request being handled chose (`select_model`)."""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass, field

from aiohttp import web

from kvtier.config import ServeConfig
from kvtier.engine import Engine

from .errors import ApiError
from .flights import Flights
from .model_names import ModelNames
from .models import LOADED, ServedModel
from .worker import ModelTooLarge, Worker

# The model the request being handled selected (each aiohttp handler runs in a task of its own).
_SELECTED: ContextVar[ServedModel | None] = ContextVar("kvtier_selected_model", default=None)


@dataclass
class DaemonState:
    config: ServeConfig
    worker: Worker
    started: int = field(default_factory=lambda: int(time.time()))
    flights: Flights = field(default_factory=Flights)  # the requests being served (GET /status)
    names: ModelNames = field(init=False)

    def __post_init__(self) -> None:
        self.names = ModelNames(self.config.models, strict=self.config.strict_model_names,
                                allow_any=self.config.allow_any_model, offline=self.config.offline)

    async def select_model(self, requested: str) -> str:
        """Resolve the request's `model` by the daemon's naming policy, load that model if it
        is not loaded, and make it this request's (`engine()`); returns the name to echo."""
        spec, echo = self.names.resolve(requested)
        if not self.worker.ready.is_set() or not self.worker.default.loads:
            self.engine()  # a 503 while the default model loads at start-up, or if it failed to
        served = self.worker.add_model(spec)
        if served.state != LOADED or served.engine is None:
            try:
                await self.worker.load(served.name)
            except Exception as exc:
                self.names.forget(spec)  # an --allow-any-model name: the next request tries again
                raise model_error(served, exc) from None
        _SELECTED.set(served)
        return echo

    def selected(self) -> ServedModel:
        """The model this request selected, else the default model."""
        return _SELECTED.get() or self.worker.default

    def engine(self) -> Engine:
        """The selected model's engine (kept after an unload: its tokenizer renders prompts),
        or a 503 while the default model is still loading."""
        served = self.selected()
        if served.engine is None:
            reason = served.load_error or "the model is still loading"
            raise ApiError(503, reason, type_="server_error", code="model_not_ready",
                           headers={"Retry-After": "5"})
        return served.engine

    def context_limit(self) -> int | None:
        """Tokens a request may span, prompt and completion: the model's `max_context`, else
        `--max-context`, else what the model's own config declares; None when none sets one
        (Mamba2: no position limit)."""
        return self.selected().spec.max_context or self.config.max_context or self.engine().context_length

    def model_id(self) -> str:
        return self.selected().name

    def model_ids(self) -> set[str]:
        """Names that always mean the loaded (default) model: its name, source, directory
        name, "default", and its exact aliases."""
        return self.names.names_of(self.names.default)


def model_error(served: ServedModel, exc: Exception) -> ApiError:
    """A model that cannot be served: too large for the memory budget (400), or failed to load."""
    if isinstance(exc, ModelTooLarge):
        return ApiError(400, str(exc), param="model", code="model_too_large")
    if isinstance(exc, ApiError):
        return exc
    return ApiError(503, f"model '{served.name}' could not be loaded: {served.load_error or exc}",
                    type_="server_error", code="model_not_ready", headers={"Retry-After": "30"})


STATE = web.AppKey("state", DaemonState)
