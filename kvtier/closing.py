"""Closing a store without waiting for its disk writes (a daemon unloading one model to load
another): the hot entries not on disk yet are queued at once, on the MLX thread (encoding
reads MLX arrays), then a thread of their own waits for the writer and closes the writer, the
readers and the tiers. Each entry's memory is released as it is written; whoever needs the
entries on disk (the same model loading again, the daemon stopping) joins the thread. A crash
meanwhile loses only entries not yet indexed: a miss, as for any write in flight."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from .tier import Tier
from .write_path import WritePath

log = logging.getLogger("kvtier.tiers")


def close_after_writes(writes: WritePath, readers: ThreadPoolExecutor, tiers: list[Tier],
                       fingerprint: str) -> threading.Thread:
    """Queue what is not on disk yet and return the started thread that closes the rest."""
    writes.queue_unwritten()
    closing = threading.Thread(target=_close, args=(writes, readers, tiers, fingerprint), name="kvtier-close")
    closing.start()
    return closing


def _close(writes: WritePath, readers: ThreadPoolExecutor, tiers: list[Tier], fingerprint: str) -> None:
    started, (jobs, queued) = time.perf_counter(), writes.writer.pending
    writes.wait()
    if jobs:
        log.info("%s: its store's last writes (%d jobs, %.1f MiB) done %.2f s after its close", fingerprint[:12],
                 jobs, queued / 2**20, time.perf_counter() - started)
    writes.writer.close()
    readers.shutdown(wait=True)
    for tier in reversed(tiers):
        tier.close()
