"""Writing what failed once the disk recovers, without waiting for a request: after a
read-only or full spell, blocks computed during it sit in RAM only; the disk tier notices
the disk is back (it tries it every 2 s) and marks a retry due, which the next request
would take. Killed before one came, the daemon lost them.

This thread looks every `interval` seconds and queues the retry on the MLX thread (encoding
a block reads its MLX arrays there, as every use of MLX in the daemon does).
"""

from __future__ import annotations

import logging
import threading

from kvtier.engine import Engine

from .worker import Worker

log = logging.getLogger("kvtier.daemon")


class WriteRetry:
    def __init__(self, worker: Worker, interval: float = 1.0):
        self.worker, self.interval = worker, interval
        self._stop = threading.Event()
        self._queued = threading.Event()  # one retry waits for the MLX thread at a time
        self._thread = threading.Thread(target=self._run, name="kvtier-write-retry", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            engine = self.worker.engine
            if engine is None or self._queued.is_set() or not engine.store.disk.retry_due:
                continue
            self._queued.set()
            if not self.worker.call_soon(self._retry):
                self._queued.clear()  # the queue is full: a request will take the retry

    def _retry(self, engine: Engine) -> None:
        try:
            engine.store.retry_writes()
        finally:
            self._queued.clear()
