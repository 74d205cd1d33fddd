"""A thread that looks at the daemon every second and, when something is due, queues one job
for the MLX thread (every use of MLX in the daemon runs there): at most one waits at a time."""

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
        self._queued = threading.Event()  # a job is waiting for (or running on) the MLX thread
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            engine = self.worker.engine
            if engine is None or self._queued.is_set() or not self.due(engine):
                continue
            self._queued.set()
            if not self.worker.call_soon(self._on_mlx_thread):
                self._queued.clear()  # the queue is full: look again next time

    def _on_mlx_thread(self, engine: Engine) -> None:
        try:
            self.job(engine)
        finally:
            self._queued.clear()
