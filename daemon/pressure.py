"""Memory-pressure watcher: when the machine runs short of memory, spill the hot tier to
SSD down to a low watermark and give MLX's buffer cache back to the OS."""

from __future__ import annotations

import logging
import threading

import mlx.core as mx
import psutil

from .worker import Worker

log = logging.getLogger("kvtier.pressure")


class PressureWatcher:
    def __init__(self, worker: Worker, available_below: int, keep_fraction: float,
                 interval: float = 1.0):
        self.worker = worker
        self.available_below = available_below  # bytes of free memory that count as pressure
        self.keep_fraction = keep_fraction  # of the RAM budget kept hot after a spill
        self.interval = interval
        self.events = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvtier-pressure", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            engine = self.worker.engine
            if engine is None or psutil.virtual_memory().available >= self.available_below:
                continue
            store = engine.store
            target = int(store.ram.budget * self.keep_fraction)
            if store.ram.num_bytes <= target:
                continue
            released = store.spill(target)
            self.events += 1
            store.count("memory_pressure_events")
            log.warning("memory pressure: spilled %d MiB of hot KV to disk", released >> 20)
            self.worker.call_soon(lambda _engine: mx.clear_cache())
