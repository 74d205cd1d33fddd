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
import gc
import itertools
import logging
import queue
import threading
import time
from typing import AsyncIterator, Callable

import mlx.core as mx

from kvtier.config import ModelSpec
from kvtier.engine import Engine, resolve_model_path
from kvtier.exactness import Exactness, measure_exactness
from kvtier.models_memory import weights_on_disk
from kvtier.requests import Chunk, GenerationRequest
from kvtier.scheduler import BATCHED, INTERLEAVED, ONE_AT_A_TIME, BatchStats, Scheduler, runs_alone

from . import faults
from .models import (
    FAILED,
    LOADED,
    LOADING,
    UNLOADED,
    Job,
    ModelTooLarge,
    ServedModel,
    expired,
    room_for,
)

log = logging.getLogger("kvtier.worker")

_DONE = object()

__all__ = ["BATCHED", "INTERLEAVED", "ONE_AT_A_TIME", "ModelBusy", "ModelTooLarge", "Overloaded", "Worker"]

# (spec, prefill step size timed at an earlier load or None, progress) -> a loaded engine
LoadEngine = Callable[[ModelSpec, "int | None", Callable[[str], None]], Engine]


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
                 keep_alive: float | None = None):
        self._load_engine = load
        self.models: dict[str, ServedModel] = {}
        for spec in specs:
            self.add_model(spec)
        self.default = self.models[specs[0].name]
        self.prefetch = prefetch  # bytes of a model's newest cache entries read into RAM once loaded
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.exact = exact  # interleave where batched decode is not bit-identical
        self.memory_budget = memory_budget
        self.keep_alive = keep_alive
        self.stats = WorkerStats()
        self._jobs: queue.Queue = queue.Queue()
        self._seq = itertools.count()
        self._holds: dict[str, int] = {}  # a model in a waiting load's way: admit only jobs before this seq
        self._outbox: Outbox | None = None
        self.ready = threading.Event()  # the default model's first load ended (loaded or failed)
        self._thread = threading.Thread(target=self._run, name="kvtier-mlx", daemon=True)
        self._planners: list[threading.Thread] = []  # plan each load's prefetch

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

    @property
    def mode(self) -> str:
        return self.default.mode

    @property
    def batching(self) -> Exactness | None:
        return self.default.batching

    def loaded_models(self) -> list[ServedModel]:
        return [m for m in list(self.models.values()) if m.loaded and m.engine is not None]

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
        for planner in self._planners:
            planner.join()

    # -- the MLX thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._serve()
        finally:
            release_thread_state()

    def _serve(self) -> None:
        try:
            self._load(self.default)
        except Exception:
            return  # logged; the daemon stops (app.py)
        finally:
            self.ready.set()
        for model in list(self.models.values()):
            if model.spec.pin and not model.loaded:
                self._try_load(model)
        self._serve_jobs()
        for model in self.loaded_models():
            self._unload(model, "the daemon stops")

    def _serve_jobs(self) -> None:
        """Take jobs into their models' backlogs, then give every model with work a turn:
        load it if need be, admit what its scheduler has room for, advance it one step."""
        stopping = False
        while True:
            stopping = self._take_jobs(block=not stopping and self._idle()) or stopping
            self._holds.clear()  # models waiting for room set them again, before the others' turns
            for model in sorted(list(self.models.values()), key=lambda m: m.loaded):
                self._turn(model)
            self._unload_expired()
            if stopping and self._idle():
                return

    def _idle(self) -> bool:
        return not any(m.backlog or m.running for m in list(self.models.values()))

    def _take_jobs(self, block: bool) -> bool:
        """Move queued jobs into their models' backlogs (waiting for one when `block`, up to a
        second with a keep-alive to check). True once the queue's end (stop) was taken."""
        timeout = 1.0 if self.keep_alive is not None else None
        while True:
            try:
                item = self._jobs.get(block=block, timeout=timeout if block else None)
            except queue.Empty:
                return False
            if item is None:
                return True
            block = False
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
        if not model.loaded and not self._make_room_and_load(model):
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
        scheduler, hold = model.scheduler, self._holds.get(model.name)
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
        self._unload(model, "asked to")
        return True

    # -- loading and unloading ----------------------------------------------------------------
    def _make_room_and_load(self, model: ServedModel) -> bool:
        """Load `model` for its backlog once it fits the memory budget: unload idle models in
        its way, or hold back the busy ones' later requests until they drain. A model that can
        never fit, or fails to load, fails its backlog."""
        if self._drop_upkeep(model):
            return False
        first = model.first_waiting()
        assert first is not None
        try:
            self._weigh(model)
            others = [m for m in list(self.models.values()) if m is not model]
            room = room_for(model, others, self.memory_budget, first) if self.memory_budget else None
        except Exception as exc:
            self._fail_backlog(model, exc)
            return False
        if room is not None and room.wait_for:
            for blocker in room.wait_for:
                self._holds[blocker.name] = min(self._holds.get(blocker.name, first), first)
            return False
        for other in room.unload if room is not None else []:
            self._unload(other, f"to make room for '{model.name}'")
        self._holds.clear()
        return self._try_load(model)

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

    def _weigh(self, model: ServedModel) -> None:
        """Its weights' size before its first load, from the files; ModelTooLarge if they
        alone pass the memory budget."""
        if not model.loads:
            model.weight_bytes = weights_on_disk(resolve_model_path(model.spec.source))
        if self.memory_budget:
            room_for(model, [], self.memory_budget, 0)

    def _try_load(self, model: ServedModel) -> bool:
        try:
            self._load(model)
        except Exception as exc:
            self._fail_backlog(model, exc)
            return False
        return True

    def _fail_backlog(self, model: ServedModel, exc: Exception) -> None:
        while model.backlog:
            job = model.backlog.popleft()
            job.emit(exc)
            job.emit(_DONE)

    def _load(self, model: ServedModel) -> None:
        """Load the model's engine, decide how its requests run, start its prefetch."""
        model.state, model.load_error, started = LOADING, None, time.perf_counter()
        log.info("loading model %s", model.name)

        def progress(phase: str) -> None:
            model.phase = phase
            log.info("%s: %s", model.name, phase)

        try:
            self._weigh(model)
            engine = self._load_engine(model.spec, model.prefill_step_size, progress)
            model.phase = "measuring batched decode"
            model.mode = self._decide_mode(model, engine)
            faults.install_from_env(engine.model)  # after the check: it feeds random tokens
        except Exception as exc:
            model.state, model.phase = FAILED, None
            model.load_error = " ".join(f"{type(exc).__name__}: {exc}".split())
            log.error("could not load the model %s: %s", model.name, model.load_error)
            log.debug("the model's load failed here", exc_info=True)
            raise
        model.engine, model.prefill_step_size = engine, engine.prefill_step_size
        model.weight_bytes = engine.weight_bytes or model.weight_bytes
        model.scheduler = Scheduler(engine, self.max_batch, _DONE, model.mode)
        model.scheduler.stats = model.stats
        model.state, model.phase, model.loads = LOADED, None, model.loads + 1
        model.load_seconds = round(time.perf_counter() - started, 3)
        model.last_used = time.monotonic()
        log.info("model %s loaded in %.1f s", model.name, model.load_seconds)
        if self.prefetch > 0:  # planned beside the MLX thread: a large index takes a while to walk
            planner = threading.Thread(target=self._plan_prefetch, args=(model, engine), name="kvtier-prefetch")
            self._planners.append(planner)
            planner.start()

    def _unload(self, model: ServedModel, why: str) -> None:
        """Close the model's scheduler and engine: its hot KV goes to disk, its memory back."""
        log.info("unloading model %s (%s)", model.name, why)
        for planner in self._planners:
            planner.join()  # a prefetch plan reads the index the store closes
        self._planners = []
        if model.scheduler is not None:
            model.scheduler.close()
        if model.engine is not None:
            model.engine.close()
        model.scheduler, model.state = None, UNLOADED
        gc.collect()
        mx.clear_cache()

    def _unload_expired(self) -> None:
        for model in expired(list(self.models.values()), self.keep_alive, time.monotonic()):
            self._unload(model, f"idle longer than the keep-alive ({self.keep_alive:g} s)")

    def _decide_mode(self, model: ServedModel, engine: Engine) -> str:
        """Batch wherever mlx-lm can merge the model's cache (the probe's verdict goes to
        /health); interleave where it cannot, where the probe could not measure, and, with
        `--exact`, where batched decode is not bit-identical. `--max-batch 1`: one row.
        Measured at the model's first load; a reload keeps the verdict."""
        if self.max_batch <= 1:
            model.batching = Exactness(True, "--max-batch 1: one request at a time, decoding alone")
            return ONE_AT_A_TIME
        if model.batching is None:
            try:
                model.batching = measure_exactness(engine)
            except Exception as exc:
                log.exception("measuring batched decode failed")
                model.batching = Exactness(False, f"measuring batched decode failed: {exc}")
        batching = model.batching
        if batching.exact or (not self.exact and batching.max_difference is not None):
            log.info("%s: continuous batching on, up to %d requests: %s", model.name, self.max_batch, batching.reason)
            return BATCHED
        log.warning("%s: requests interleave (up to %d, each decoding its own row) instead of batching: %s",
                    model.name, self.max_batch, batching.reason)
        return INTERLEAVED

    def _plan_prefetch(self, model: ServedModel, engine: Engine) -> None:
        try:
            prefetch = engine.store.plan_prefetch(self.prefetch)
            # Even with nothing planned (an empty cache): its one step ends it, so it says done.
            if not self.call_soon(self._prefetch_step, model.name):
                prefetch.end("queue full")
        except Exception:  # no prefetch: requests read from disk as without one
            log.exception("planning the start-up prefetch failed")

    def _prefetch_step(self, engine: Engine) -> None:
        """One slice of the prefetch; the next is queued behind what has arrived, so a request
        waits for one slice at most."""
        name = next((m.name for m in self.loaded_models() if m.engine is engine), None)
        if name is not None and engine.prefetch_step() and not self.call_soon(self._prefetch_step, name):
            assert engine.store.prefetch is not None  # it has just taken a step
            engine.store.prefetch.end("queue full")

    def describe(self, model: ServedModel | None = None) -> dict:
        """A model's batching mode and live numbers, for /health, /cache/stats and /metrics."""
        model = model or self.default
        batching = model.batching
        running = len(model.scheduler) if model.scheduler is not None else 0
        return {"mode": model.mode, "enabled": model.mode == BATCHED, "max_batch": self.max_batch,
                "exact": model.mode != BATCHED or bool(batching and batching.exact),
                "reason": batching.reason if batching else "model loading",
                "max_logprob_difference": batching.max_difference if batching else None,
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
