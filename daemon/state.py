"""What the aiohttp app shares between routes: settings, the MLX worker, start time."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

from kvtier.config import ServeConfig
from kvtier.engine import Engine

from .errors import ApiError
from .flights import Flights
from .model_names import ModelNames
from .worker import Worker


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

    def engine(self) -> Engine:
        """The loaded engine, or a 503 while the model is still loading."""
        if self.worker.engine is None:
            reason = self.worker.load_error or "the model is still loading"
            raise ApiError(503, reason, type_="server_error", code="model_not_ready",
                           headers={"Retry-After": "5"})
        return self.worker.engine

    def context_limit(self) -> int | None:
        """Tokens a request may span, prompt and completion: `--max-context`, else what the
        model's own config declares; None when neither sets one (Mamba2: no position limit)."""
        return self.config.max_context or self.engine().context_length

    def model_id(self) -> str:
        return self.config.model

    def model_ids(self) -> set[str]:
        """Names that always mean the loaded (default) model: its name, source, directory
        name, "default", and its exact aliases."""
        return self.names.names_of(self.names.default)

    def requested_model(self, requested: str) -> str:
        """The request's `model`, checked by the daemon's naming policy; this is the name
        the response echoes."""
        return self.names.resolve(requested)[1]


STATE = web.AppKey("state", DaemonState)
