"""A thread that looks at the daemon every second and, when something is due for a loaded
model, queues one job per such model for the MLX thread (every use of MLX in the daemon runs
there); nothing new is queued while earlier jobs wait."""

from __future__ import annotations

import threading
from typing import Callable

from kvtier.engine import Engine

from .worker import Worker


class MlxThreadPoll:
    def __init__(self, worker: Worker, name: str, due: Callable[[Engine], bool],
                 job: Callable[[Engine], None], interval: float = 1.0):
        self.worker, self.due, self.job, self.interval = worker, due, job, interval
        self._stop = threading.Event()
        self._outstanding = 0  # jobs waiting for (or running on) the MLX thread
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self._outstanding:
                continue
            for model in self.worker.loaded_models():
                if model.engine is None or not self.due(model.engine):
                    continue
                with self._lock:
                    self._outstanding += 1
                if not self.worker.call_soon(self._on_mlx_thread, model.name, on_drop=self._done):
                    self._done()  # the queue is full: look again next time

    def _on_mlx_thread(self, engine: Engine) -> None:
        try:
            self.job(engine)
        finally:
            self._done()

    def _done(self) -> None:
        with self._lock:
            self._outstanding -= 1
