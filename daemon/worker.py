"""The one thread that owns MLX: loads the models (daemon/models.py decides which, under the
memory budget), then serves every request through its model's scheduler (kvtier/scheduler.py),
the loaded models' schedulers advanced in turn. A scheduler decodes its requests in one batch,
or interleaved (each request decoding its own row in turn) where mlx-lm cannot batch the
model's cache, or with `--exact` where batched decode is not bit-identical to decoding alone;
`--max-batch 1` is a scheduler of one.

HTTP handlers submit jobs and read chunks back through an asyncio queue; a client that goes
away sets the job's cancel flag, and the worker drops it (from the batch at its next step).
No other thread in the daemon evaluates MLX arrays: they hand such work to `call` / `call_soon`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from typing import AsyncIterator, Callable

import mlx.core as mx

from kvtier.config import ModelSpec
from kvtier.engine import Engine
from kvtier.requests import Chunk, GenerationRequest
from kvtier.scheduler import BATCHED, INTERLEAVED, ONE_AT_A_TIME, BatchStats, Scheduler, runs_alone

from .loading import LoadEngine, Loader
from .models import Job, ModelTooLarge, ServedModel

log = logging.getLogger("kvtier.worker")

_DONE = object()

# Idle work (a prefetch's first slice, the batched-decode probe's pieces) starts only once the
# MLX thread has had nothing to do this long: a route that has just had its model loaded renders
# the prompt and submits its request a few milliseconds later, and must find nothing running.
QUIET_SECONDS = 0.5
# A request that finds the MLX thread idle waits this long for the ones sent with it (an
# agent's parallel calls reach the queue 3-14 ms apart, each templated on the HTTP thread in
# turn): they prefill and take their first tokens together instead of behind the first one's
# lone step (at 8 streams ~5% more aggregate decode, measured), for 10 ms on a lone TTFT.
GATHER_SECONDS = 0.01

__all__ = ["BATCHED", "INTERLEAVED", "ONE_AT_A_TIME", "LoadEngine", "ModelBusy", "ModelTooLarge", "Overloaded",
           "Worker"]


class Overloaded(Exception):
    """More requests are waiting than the daemon is configured to queue."""


class ModelBusy(Exception):
    """An unload asked for while the model serves requests."""


class _IfLoaded:
    """A call for a model only while it is loaded (upkeep: prefetch, spills, write retries):
    it never loads one, and is dropped when the model is not loaded."""

    def __init__(self, fn: Callable[[Engine], object], on_drop: Callable[[], None] | None = None):
        self.fn, self.on_drop = fn, on_drop

    def dropped(self) -> None:
        if self.on_drop is not None:
            self.on_drop()


class Worker:
    def __init__(self, load: LoadEngine, specs: list[ModelSpec], max_waiting: int = 32, max_batch: int = 1,
                 exact: bool = False, prefetch: int = 0, memory_budget: int | None = None,
                 keep_alive: float | None = None, before_loads: Callable[[], None] | None = None):
        """`before_loads`: run on the MLX thread before the first load (daemon/prefill_fits.py)."""
        self.models: dict[str, ServedModel] = {}
        self._before_loads = before_loads
        for spec in specs:
            self.add_model(spec)
        self.default = self.models[specs[0].name]
        self.max_batch, self.max_waiting = max_batch, max_waiting
        # prefetch: bytes of a model's newest cache entries read into RAM once it is loaded
        self.loader = Loader(load, self.models, self.call_soon, _DONE, max_batch, exact, prefetch, memory_budget,
                             keep_alive)
        self.stats = WorkerStats()
        self._jobs: queue.Queue = queue.Queue()
        self._seq = itertools.count()
        self._outbox: Outbox | None = None
        self.ready = threading.Event()  # the default model's first load ended (loaded or failed)
        self._last_work = time.monotonic()  # when the MLX thread last had a job or a member to serve
        self._thread = threading.Thread(target=self._run, name="kvtier-mlx", daemon=True)

    def add_model(self, spec: ModelSpec) -> ServedModel:
        """A model to serve (a configured one, or one a request names with --allow-any-model)."""
        if spec.name not in self.models:
            self.models[spec.name] = ServedModel(spec)
        return self.models[spec.name]

    # -- what the rest of the daemon reads (the default model's, for one-model callers) -----
    @property
    def engine(self) -> Engine | None:
        """The default model's engine while it is loaded."""
        return self.default.engine if self.default.loaded else None

    @property
    def load_error(self) -> str | None:
        return self.default.load_error

    @property
    def batch(self) -> Scheduler | None:
        return self.default.scheduler

    def loaded_models(self) -> list[ServedModel]:
        return self.loader.loaded()

    def start(self) -> None:
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._jobs.qsize() + sum(len(m.backlog) for m in list(self.models.values()))

    # -- submitting work (from the event loop or other threads) -----------------------------
    async def generate(self, request: GenerationRequest, model: str | None = None) -> AsyncIterator[Chunk]:
        """Queue a request for `model` (default: the default model) and stream its chunks;
        cancels the job if the caller stops reading."""
        async for chunk in self._submit(request, model):
            yield chunk

    async def call(self, fn: Callable[[Engine], object], model: str | None = None) -> object:
        """Run `fn(engine)` on the MLX thread with `model` loaded, between steps; its result."""
        async for item in self._submit(fn, model):
            return item
        return None

    async def load(self, model: str) -> None:
        """Load `model` if it is not loaded (unloading others for room as the budget says)."""
        await self.call(lambda engine: None, model)

    async def unload(self, model: str) -> bool:
        """Unload `model` now (its hot KV written to disk first); False if it was not loaded.
        ModelBusy while it serves requests."""
        async for item in self._submit(_Unload(), model):
            return bool(item)
        return False

    def call_soon(self, fn: Callable[[Engine], object], model: str | None = None,
                  on_drop: Callable[[], None] | None = None) -> bool:
        """Queue `fn(engine)` for `model` if it is loaded, from any thread, without waiting
        (`on_drop` runs instead if it is not loaded by then); False when the queue is full
        (the caller may try again later)."""
        if self.waiting >= self.max_waiting:
            return False
        self._jobs.put((model or self.default.name, _IfLoaded(fn, on_drop), lambda item: None))
        return True

    async def _submit(self, work: object, model: str | None) -> AsyncIterator:
        outbox = self._outbox_of(asyncio.get_running_loop())
        out: asyncio.Queue = asyncio.Queue()

        def emit(item: object) -> None:
            outbox.put(out, item)

        if self.waiting >= self.max_waiting:
            raise Overloaded()
        self._jobs.put((model or self.default.name, work, emit))
        try:
            while (item := await out.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if isinstance(work, GenerationRequest):
                work.cancelled.set()

    def _outbox_of(self, loop: asyncio.AbstractEventLoop) -> "Outbox":
        if self._outbox is None or self._outbox.loop is not loop:
            self._outbox = Outbox(loop)
        return self._outbox

    def stop(self) -> None:
        """Finish the queued jobs, flush every model's blocks to disk, close the caches, and
        wait for all of it: no MLX work may still run when the interpreter shuts down."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        self.loader.join()

    # -- the MLX thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._serve()
        finally:
            release_thread_state()

    def _serve(self) -> None:
        try:
            if self._before_loads is not None:
                self._before_loads()
            self.loader.load(self.default)
        except Exception:
            return  # logged; the daemon stops (app.py)
        finally:
            self.ready.set()
        for model in list(self.models.values()):
            if model.spec.pin and not model.loaded:
                self.loader.try_load(model)
        self._serve_jobs()
        for model in self.loaded_models():
            self.loader.unload(model, "the daemon stops")
        self.loader.close()

    def _serve_jobs(self) -> None:
        """Take jobs into their models' backlogs, then give every model with work a turn:
        load it if need be, admit what its scheduler has room for, advance it one step."""
        stopping = False
        while True:
            idle = not stopping and self._idle()
            quiet_in = self._quiet_in() if idle and self._jobs.empty() and self.loader.idle_work() else None
            if quiet_in is not None and quiet_in <= 0 and self.loader.idle_step():
                continue  # jobs that came meanwhile first
            arrived = self._last_work
            stopping = self._take_jobs(block=idle, wait=quiet_in if quiet_in and quiet_in > 0 else None) or stopping
            self.loader.holds.clear()  # models waiting for room set them again, before the others' turns
            for model in sorted(list(self.models.values()), key=lambda m: m.loaded):
                self._turn(model)
            self.loader.unload_expired()
            if not idle or self._last_work != arrived:  # it served something: quiet from now on
                self._last_work = time.monotonic()
            if stopping and self._idle():
                return

    def _quiet_in(self) -> float:
        """Seconds until the MLX thread has been without work for QUIET_SECONDS (<= 0: it has)."""
        return self._last_work + QUIET_SECONDS - time.monotonic()

    def _idle(self) -> bool:
        return not any(m.backlog or m.running for m in list(self.models.values()))

    def _take_jobs(self, block: bool, wait: float | None = None) -> bool:
        """Move queued jobs into their models' backlogs (waiting for one when `block`, up to a
        second with a keep-alive to check, or `wait` seconds). True once the queue's end
        (stop) was taken."""
        timeout = 1.0 if self.loader.keep_alive is not None else None
        if wait is not None:
            timeout = min(wait, timeout) if timeout is not None else wait
        gather_until = None  # once a request wakes the idle thread: GATHER_SECONDS from then
        while True:
            try:
                if gather_until is not None:
                    item = self._jobs.get(timeout=max(gather_until - time.monotonic(), 0.0))
                else:
                    item = self._jobs.get(block=block, timeout=timeout if block else None)
            except queue.Empty:
                return False
            if item is None:
                return True
            if block and isinstance(item[1], GenerationRequest):
                gather_until = time.monotonic() + GATHER_SECONDS
            block = False
            self._last_work = time.monotonic()
            name, work, emit = item
            model = self.models[name]
            if isinstance(work, GenerationRequest) and work.cancelled.is_set():
                emit(_DONE)
            elif isinstance(work, _IfLoaded) and not model.loaded:
                work.dropped()
                emit(_DONE)
            else:
                model.backlog.append(Job(work, emit, next(self._seq)))

    def _turn(self, model: ServedModel) -> None:
        if not model.backlog and not model.running:
            return
        if not model.loaded and (self._drop_upkeep(model) or not self.loader.make_room_and_load(model)):
            return
        model.last_used = time.monotonic()
        self._admit(model)
        if model.scheduler is not None and not model.scheduler.idle:
            model.scheduler.advance()
            model.last_used = time.monotonic()

    def _admit(self, model: ServedModel) -> None:
        """Start the backlog's jobs in order while the scheduler has room. A seeded sampling
        request waits for every model's scheduler to drain and runs as the daemon's only
        request (its random stream is the process's one); requests that arrived after it wait.
        Held (another model waits for room): only the jobs that arrived before that model's."""
        scheduler, hold = model.scheduler, self.loader.holds.get(model.name)
        assert scheduler is not None and model.engine is not None
        seeded = self._seeded_waiting()
        while model.backlog and (hold is None or model.backlog[0].seq < hold):
            job = model.backlog[0]
            if isinstance(job.work, GenerationRequest):
                if job.work.cancelled.is_set():
                    model.backlog.popleft()
                    job.emit(_DONE)
                    continue
                if scheduler.full or self._one_runs_alone() or (seeded is not None and job.seq > seeded):
                    return
                if runs_alone(job.work) and any(m.running for m in list(self.models.values())):
                    return
                model.backlog.popleft()
                self._start(model, job)
            else:
                model.backlog.popleft()
                self._call(model, job)

    def _one_runs_alone(self) -> bool:
        return any(m.scheduler is not None and m.scheduler.alone for m in list(self.models.values()))

    def _seeded_waiting(self) -> int | None:
        """The arrival of the first seeded sampling request at the head of a backlog, if any."""
        heads = [m.backlog[0] for m in list(self.models.values()) if m.backlog]
        return min((j.seq for j in heads if isinstance(j.work, GenerationRequest) and runs_alone(j.work)),
                   default=None)

    def _start(self, model: ServedModel, job: Job) -> None:
        assert model.scheduler is not None
        self.stats.waited(job.work)
        log.debug("%s: a request of %d prompt tokens admitted", model.name, len(job.work.prompt_tokens))
        try:
            model.scheduler.add(job.work, job.emit)
        except Exception as exc:
            log.exception("restoring a request failed")
            job.emit(exc)
            job.emit(_DONE)

    def _call(self, model: ServedModel, job: Job) -> None:
        work = job.work
        try:
            if isinstance(work, _Unload):
                job.emit(self._unload_asked(model))
            else:
                fn = work.fn if isinstance(work, _IfLoaded) else work
                assert model.engine is not None
                job.emit(fn(model.engine))
        except Exception as exc:
            if not isinstance(exc, ModelBusy):
                log.exception("a job on the MLX thread failed")
            job.emit(exc)
        job.emit(_DONE)

    def _unload_asked(self, model: ServedModel) -> bool:
        if model.running or any(isinstance(j.work, GenerationRequest) for j in model.backlog):
            raise ModelBusy(f"model '{model.name}' is serving requests")
        if not model.loaded:
            return False
        self.loader.unload(model, "asked to")
        return True

    def _drop_upkeep(self, model: ServedModel) -> bool:
        """Upkeep calls and cancelled requests for a model that is not loaded are dropped,
        unloads answered (False): none loads it. True when nothing else is left to load it for."""
        for job in [j for j in model.backlog if _needs_no_load(j.work)]:
            model.backlog.remove(job)
            if isinstance(job.work, _IfLoaded):
                job.work.dropped()
            if isinstance(job.work, _Unload):
                job.emit(False)
            job.emit(_DONE)
        return not model.backlog

    def describe(self, model: ServedModel | None = None) -> dict:
        """A model's batching mode and live numbers, for /health, /cache/stats and /metrics."""
        model = model or self.default
        batching = model.batching
        running = len(model.scheduler) if model.scheduler is not None else 0
        return {"mode": model.mode, "enabled": model.mode == BATCHED, "max_batch": self.max_batch,
                "exact": model.mode != BATCHED or bool(batching and batching.exact),
                "reason": batching.reason if batching else (
                    "batched; the start-up check runs once the daemon is idle" if model.measure_when_idle
                    else "model loading"),
                "max_logprob_difference": batching.max_difference if batching else None,
                "batched_prefill": bool(model.scheduler is not None and model.scheduler.join_rests),
                "running": running, **self.stats.as_dict(model.stats)}


class _Unload:
    """The job of `Worker.unload`."""


def _needs_no_load(work: object) -> bool:
    cancelled = isinstance(work, GenerationRequest) and work.cancelled.is_set()
    return cancelled or isinstance(work, (_IfLoaded, _Unload))
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
