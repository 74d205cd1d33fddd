"""The one thread that owns MLX: loads the engine, then runs generation jobs one at a time.

HTTP handlers submit jobs and read chunks back through an asyncio queue; a client that goes
away sets the job's cancel flag, and the worker moves on to the next job. No other thread in
the daemon evaluates MLX arrays: they hand such work to `call` / `call_soon`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import AsyncIterator, Callable

import mlx.core as mx

from kvtier.engine import Chunk, Engine, GenerationRequest

log = logging.getLogger("kvtier.worker")

_DONE = object()


class Overloaded(Exception):
    """More requests are waiting than the daemon is configured to queue."""


class Worker:
    def __init__(self, make_engine: Callable[[], Engine], max_waiting: int = 32):
        self._make_engine = make_engine
        self._jobs: queue.Queue = queue.Queue(maxsize=max_waiting)
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvtier-mlx", daemon=True)

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
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()

        def emit(item: object) -> None:
            loop.call_soon_threadsafe(out.put_nowait, item)

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
            self.engine = self._make_engine()
        except Exception as exc:
            log.exception("could not load the model")
            self.load_error = f"{type(exc).__name__}: {exc}"
            return
        finally:
            self.ready.set()
        while (job := self._jobs.get()) is not None:
            work, emit = job
            try:
                if not isinstance(work, GenerationRequest):
                    emit(work(self.engine))
                elif not work.cancelled.is_set():
                    for chunk in self.engine.generate(work):
                        emit(chunk)
            except Exception as exc:
                log.exception("a job on the MLX thread failed")
                emit(exc)
            emit(_DONE)
        self.engine.close()


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
