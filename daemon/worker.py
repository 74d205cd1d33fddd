"""The one thread that owns MLX: loads the engine, then serves every generation request
through one scheduler (kvtier/scheduler.py): decoded in one batch, or interleaved (each
request decoding its own row in turn) where mlx-lm cannot batch the model's cache, or with
`--exact` where batched decode is not bit-identical to decoding alone; `--max-batch 1` is a
scheduler of one.

HTTP handlers submit jobs and read chunks back through an asyncio queue; a client that goes
away sets the job's cancel flag, and the worker drops it (from the batch at its next step).
No other thread in the daemon evaluates MLX arrays: they hand such work to `call` / `call_soon`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import AsyncIterator, Callable

import mlx.core as mx

from kvtier.engine import Engine
from kvtier.exactness import Exactness, measure_exactness
from kvtier.requests import Chunk, GenerationRequest
from kvtier.scheduler import BatchStats, Scheduler, runs_alone

from . import faults

log = logging.getLogger("kvtier.worker")

_DONE = object()

# How concurrent requests run (`/health` batching.mode).
BATCHED = "batched"  # one forward pass of all rows per decode step
INTERLEAVED = "interleaved"  # each request's own one-row pass, in turn: a lone request's arithmetic
ONE_AT_A_TIME = "one at a time"  # --max-batch 1: a scheduler of one


class Overloaded(Exception):
    """More requests are waiting than the daemon is configured to queue."""


class Worker:
    def __init__(self, make_engine: Callable[[], Engine], max_waiting: int = 32, max_batch: int = 1,
                 exact: bool = False, prefetch: int = 0):
        self._make_engine = make_engine
        self.prefetch = prefetch  # bytes of the newest cache entries read into RAM once loaded
        self.max_batch = max_batch
        self.exact = exact  # interleave where batched decode is not bit-identical
        self.batching: Exactness | None = None  # decided once the model is loaded
        self.batch: Scheduler | None = None
        self.mode = ONE_AT_A_TIME
        self.stats = WorkerStats()
        self._jobs: queue.Queue = queue.Queue(maxsize=max_waiting)
        self._outbox: Outbox | None = None
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvtier-mlx", daemon=True)
        self._planner: threading.Thread | None = None  # plans the start-up prefetch

    def start(self) -> None:
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._jobs.qsize()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Queue a request and stream its chunks; cancels the job if the caller stops reading."""
        async for chunk in self._submit(request):
            yield chunk

    async def _submit(self, job: GenerationRequest | Callable) -> AsyncIterator:
        outbox = self._outbox_of(asyncio.get_running_loop())
        out: asyncio.Queue = asyncio.Queue()

        def emit(item: object) -> None:
            outbox.put(out, item)

        try:
            self._jobs.put_nowait((job, emit))
        except queue.Full:
            raise Overloaded() from None
        try:
            while (item := await out.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if isinstance(job, GenerationRequest):
                job.cancelled.set()

    def _outbox_of(self, loop: asyncio.AbstractEventLoop) -> "Outbox":
        if self._outbox is None or self._outbox.loop is not loop:
            self._outbox = Outbox(loop)
        return self._outbox

    async def call(self, fn: Callable[[Engine], object]) -> object:
        """Run `fn(engine)` on the MLX thread, between generations, and return its result."""
        async for item in self._submit(fn):
            return item
        return None

    def call_soon(self, fn: Callable[[Engine], object]) -> bool:
        """Queue `fn(engine)` from any thread without waiting for it; False when the queue
        is full (the caller may try again later)."""
        try:
            self._jobs.put_nowait((fn, lambda item: None))
        except queue.Full:
            return False
        return True

    def stop(self) -> None:
        """Finish the queued jobs, flush every block to disk, close the cache, and wait for
        all of it: no MLX work may still run when the interpreter shuts down."""
        if self._planner is not None:
            self._planner.join()  # it reads the index the MLX thread closes at the end
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            release_thread_state()

    def _serve(self) -> None:
        try:
            engine = self._make_engine()
            self.mode = self._decide_mode(engine)
            faults.install_from_env(engine.model)  # after the check: it feeds random tokens
            self.engine = engine
            if self.prefetch > 0:  # planned beside the MLX thread: a large index takes a while to walk
                self._planner = threading.Thread(target=self._plan_prefetch, args=(engine,), name="kvtier-prefetch")
                self._planner.start()
        except Exception as exc:
            self.load_error = " ".join(f"{type(exc).__name__}: {exc}".split())
            log.error("could not load the model: %s", self.load_error)  # one line; the daemon stops
            log.debug("the model's load failed here", exc_info=True)
            return
        finally:
            self.ready.set()
        self._serve_requests(engine)
        engine.close()

    def _decide_mode(self, engine: Engine) -> str:
        """Batch wherever mlx-lm can merge the model's cache (the probe's verdict goes to
        /health); interleave where it cannot, where the probe could not measure, and, with
        `--exact`, where batched decode is not bit-identical. `--max-batch 1`: one row."""
        if self.max_batch <= 1:
            self.batching = Exactness(True, "--max-batch 1: one request at a time, decoding alone")
            return ONE_AT_A_TIME
        try:
            self.batching = measure_exactness(engine)
        except Exception as exc:
            log.exception("measuring batched decode failed")
            self.batching = Exactness(False, f"measuring batched decode failed: {exc}")
        if self.batching.exact or (not self.exact and self.batching.max_difference is not None):
            log.info("continuous batching on, up to %d requests: %s", self.max_batch, self.batching.reason)
            return BATCHED
        log.warning("requests interleave (up to %d, each decoding its own row) instead of batching: %s",
                    self.max_batch, self.batching.reason)
        return INTERLEAVED

    def _plan_prefetch(self, engine: Engine) -> None:
        try:
            prefetch = engine.store.plan_prefetch(self.prefetch)
            # Even with nothing planned (an empty cache): its one step ends it, so it says done.
            if not self.call_soon(self._prefetch_step):
                prefetch.end("queue full")
        except Exception:  # no prefetch: requests read from disk as without one
            log.exception("planning the start-up prefetch failed")

    def _prefetch_step(self, engine: Engine) -> None:
        """One slice of the start-up prefetch; the next is queued behind what has arrived,
        so a request waits for one slice at most."""
        if engine.prefetch_step() and not self.call_soon(self._prefetch_step):
            assert engine.store.prefetch is not None  # it has just taken a step
            engine.store.prefetch.end("queue full")

    def _serve_requests(self, engine: Engine) -> None:
        """Admit jobs while the scheduler has room (block only when it is empty), step it.
        A seeded sampling request waits for the scheduler to drain and runs as its only
        member: its random stream is the process's one."""
        self.batch = scheduler = Scheduler(engine, self.max_batch, _DONE, interleaved=self.mode != BATCHED)
        alone, stopping = None, False
        while True:
            if not stopping and alone is None and not scheduler.alone:
                alone, stopping = self._take_jobs(scheduler)
            if alone is not None and scheduler.idle:
                self._admit(scheduler, *alone)
                alone = None
            if not scheduler.idle:
                scheduler.advance()
            elif stopping and alone is None:
                break
        scheduler.close()

    def _take_jobs(self, scheduler: Scheduler) -> tuple[tuple | None, bool]:
        """Admit waiting jobs while the scheduler has room. Returns a seeded sampling job,
        which must wait for the scheduler to drain, and whether the queue's end (stop) was taken."""
        while not scheduler.full:
            try:
                job = self._jobs.get(block=scheduler.idle)
            except queue.Empty:
                break
            if job is None:
                return None, True
            work, emit = job
            if not isinstance(work, GenerationRequest):
                self._call(work, emit)
            elif work.cancelled.is_set():
                emit(_DONE)
            elif runs_alone(work):
                return job, False
            else:
                self._admit(scheduler, work, emit)
        return None, False

    def _call(self, fn: Callable[[Engine], object], emit: Callable) -> None:
        try:
            assert self.engine is not None  # loaded before any job is served
            emit(fn(self.engine))
        except Exception as exc:
            log.exception("a job on the MLX thread failed")
            emit(exc)
        emit(_DONE)

    def _admit(self, scheduler: Scheduler, request: GenerationRequest, emit: Callable) -> None:
        self.stats.waited(request)
        try:
            scheduler.add(request, emit)
        except Exception as exc:
            log.exception("restoring a request failed")
            emit(exc)
            emit(_DONE)

    def describe(self) -> dict:
        """Batching mode and live numbers, for /health, /cache/stats and /metrics."""
        batching = self.batching
        running = len(self.batch) if self.batch is not None else 0
        return {"mode": self.mode, "enabled": self.mode == BATCHED, "max_batch": self.max_batch,
                "exact": self.mode != BATCHED or bool(batching and batching.exact),
                "reason": batching.reason if batching else "model loading",
                "max_logprob_difference": batching.max_difference if batching else None,
                "running": running, **self.stats.as_dict(self.batch.stats if self.batch is not None else None)}


class Outbox:
    """Items from the MLX thread to the event loop's queues, in order, with one wake-up of
    the loop for all that arrive before it runs: a batch step emits a chunk per request, and
    each `call_soon_threadsafe` is a write to the loop's self-pipe and a thread switch."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: list[tuple[asyncio.Queue, object]] = []
        self._lock = threading.Lock()

    def put(self, out: asyncio.Queue, item: object) -> None:
        with self._lock:
            self._items.append((out, item))
            if len(self._items) > 1:
                return  # a wake-up is on its way and will deliver this one too
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for out, item in items:
            out.put_nowait(item)


class WorkerStats:
    """Queue wait; token rates come from the scheduler's BatchStats (written on the MLX thread only)."""

    def __init__(self):
        self.admitted = 0
        self.queue_wait_seconds = 0.0

    def waited(self, request: GenerationRequest) -> None:
        self.admitted += 1
        self.queue_wait_seconds += time.perf_counter() - request.queued_at

    def as_dict(self, batch: BatchStats | None) -> dict:
        batch = batch or BatchStats()
        prefill = (batch.prefill_tokens, batch.prefill_seconds)
        decode = (batch.decode_tokens, batch.decode_seconds)
        return {
            "admitted_requests": self.admitted,
            "queue_wait_seconds_total": round(self.queue_wait_seconds, 6),
            "prefill_tokens": prefill[0], "prefill_seconds": round(prefill[1], 6),
            "prefill_tokens_per_second": _rate(*prefill),
            "decode_tokens": decode[0], "decode_seconds": round(decode[1], 6),
            "decode_tokens_per_second": _rate(*decode),
            "longest_decode_step_gap_seconds": round(batch.longest_step_gap, 6),
        }


def _rate(tokens: int, seconds: float) -> float | None:
    return round(tokens / seconds, 1) if seconds > 0 else None


def release_thread_state() -> None:
    """Finish this thread's queued MLX work and free what MLX keeps per thread (its streams,
    and the cache of mx.compile'd functions, which holds Python objects). Left to the
    thread's C++ exit destructors, that cache is freed after `join()` has returned and can
    need the interpreter while it is shutting down: Python then kills the thread inside a
    destructor and the process aborts ("terminate called without an active exception")."""
    mx.synchronize()
    clear_streams = getattr(mx, "clear_streams", None)  # MLX versions with per-thread state
    if clear_streams is not None:
        clear_streams()
