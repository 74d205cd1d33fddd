"""Memory-pressure watcher: when the machine runs short of memory, spill the hot tier to
SSD down to a low watermark and give MLX's buffer cache back to the OS.

The watcher thread only measures; the spill (which copies MLX arrays out to encode them)
runs on the MLX thread, between requests, like every other use of MLX in the daemon.
"""

from __future__ import annotations

import logging

import mlx.core as mx
import psutil

from kvtier.engine import Engine

from .mlx_poll import MlxThreadPoll
from .worker import Worker

log = logging.getLogger("kvtier.pressure")


class PressureWatcher:
    def __init__(self, worker: Worker, available_below: int, keep_fraction: float,
                 interval: float = 1.0):
        self.available_below = available_below  # bytes of free memory that count as pressure
        self.keep_fraction = keep_fraction  # of the RAM budget kept hot after a spill
        self.events = 0
        self._poll = MlxThreadPoll(worker, "kvtier-pressure", self._under_pressure, self._spill, interval)

    def start(self) -> None:
        self._poll.start()

    def stop(self) -> None:
        self._poll.stop()

    def _under_pressure(self, _: Engine) -> bool:
        return psutil.virtual_memory().available < self.available_below

    def _spill(self, engine: Engine) -> None:
        """On the MLX thread: shrink the hot tier to the low watermark."""
        store = engine.store
        target = int(store.config.ram_budget * self.keep_fraction)
        if store.hot_bytes() <= target:
            return
        released = store.spill(target)
        self.events += 1
        store.count("memory_pressure_events")
        log.warning("memory pressure: spilled %d MiB of hot KV to disk", released >> 20)
        mx.clear_cache()
