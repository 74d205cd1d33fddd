"""Writing what failed once the disk recovers, without waiting for a request: after a
read-only or full spell, blocks computed during it sit in RAM only; the disk tier notices
the disk is back (it tries it every 2 s) and marks a retry due, which the next request
would take. Killed before one came, the daemon lost them.

A poll queues the retry on the MLX thread (encoding a block reads its MLX arrays there).
"""

from __future__ import annotations

from kvtier.engine import Engine

from .mlx_poll import MlxThreadPoll
from .worker import Worker


def write_retry(worker: Worker) -> MlxThreadPoll:
    return MlxThreadPoll(worker, "kvtier-write-retry", _retry_due, _retry)


def _retry_due(engine: Engine) -> bool:
    return engine.store.disk.retry_due


def _retry(engine: Engine) -> None:
    engine.store.retry_writes()
