"""Loading and unloading models on the MLX thread (for daemon/worker.py): room made under the
memory budget (the policy is daemon/models.py's), the engine loaded and its decode mode decided
(batched, or interleaved where batching is not exact and `--exact` asks), its prefetch started;
an unload closes the engine, which writes its hot KV to disk and gives the memory back."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Generator

from kvtier import exactness
from kvtier.chunking import PrefillChunk
from kvtier.config import ModelSpec
from kvtier.disk_registry import release_disk, retain
from kvtier.engine import Engine, resolve_model_path
from kvtier.exactness import Exactness, measure_and_keep, recall_exactness, unbatchable_reason
from kvtier.local import LocalDisk
from kvtier.models_memory import weights_on_disk
from kvtier.scheduler import BATCHED, INTERLEAVED, ONE_AT_A_TIME, Scheduler
from kvtier.tier import Count

from . import faults
from .models import FAILED, LOADED, LOADING, UNLOADED, ServedModel, expired, room_for

log = logging.getLogger("kvtier.worker")

# (spec, prefill step size timed at an earlier load or None, progress, the engine of the model's
# earlier load or None) -> a loaded engine
LoadEngine = Callable[[ModelSpec, "PrefillChunk | None", Callable[[str], None], "Engine | None"], Engine]
CallSoon = Callable[..., bool]  # Worker.call_soon


class Loader:
    def __init__(self, load_engine: LoadEngine, models: dict[str, ServedModel], call_soon: CallSoon,
                 done: object, max_batch: int, exact: bool, prefetch: int, memory_budget: int | None,
                 keep_alive: float | None):
        self._load_engine, self.models, self._call_soon, self._done = load_engine, models, call_soon, done
        self.max_batch, self.exact, self.prefetch = max_batch, exact, prefetch
        self.memory_budget, self.keep_alive = memory_budget, keep_alive
        self.holds: dict[str, int] = {}  # a model in a waiting load's way: admit only jobs before this seq
        self._planners: list[threading.Thread] = []  # plan each load's prefetch
        # The cache directory's disk, held open from the first load to the end: a switch
        # between models would otherwise close the index with the one and open it for the other.
        self._disk_hold: tuple[LocalDisk, Count] | None = None
        # Unloaded models' stores, closing once their queued disk writes are done: a model
        # loads only after its own (its turn restores them); the daemon stops after all.
        self._closing: dict[str, threading.Thread] = {}
        self._probes: dict[str, tuple[float, Generator[None, None, Exactness]]] = {}  # idle probes begun
        # Loaded models whose planned prefetch starts in the idle time: a request the load was
        # for restores what it needs itself (straight into its buffers), not after a slice.
        self._prefetches: dict[str, Engine] = {}

    def loaded(self) -> list[ServedModel]:
        return [m for m in list(self.models.values()) if m.loaded and m.engine is not None]

    def join(self) -> None:
        for planner in self._planners:
            planner.join()

    def close(self) -> None:
        """After the last unload: the unloaded stores' writes done, then the cache directory's
        disk closes with its last holder."""
        self.wait_for_writes()
        if self._disk_hold is not None:
            release_disk(*self._disk_hold)
            self._disk_hold = None

    def wait_for_writes(self, timeout: float | None = None, name: str | None = None) -> bool:
        """Wait until the unloaded models' stores (or `name`'s) have written what they still
        had queued and closed; True if they did in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for model, closing in list(self._closing.items()):
            if name is None or model == name:
                closing.join(None if deadline is None else max(deadline - time.monotonic(), 0))
                if not closing.is_alive() and self._closing.get(model) is closing:  # not a later unload's
                    del self._closing[model]
        return not any(name is None or model == name for model in list(self._closing))

    def make_room_and_load(self, model: ServedModel) -> bool:
        """Load `model` for its backlog once it fits the memory budget: unload idle models in
        its way, or hold back the busy ones' later requests until they drain. A model that can
        never fit, or fails to load, fails its backlog."""
        first = model.first_waiting()
        assert first is not None
        try:
            self._weigh(model)
            others = [m for m in list(self.models.values()) if m is not model]
            room = room_for(model, others, self.memory_budget, first) if self.memory_budget else None
        except Exception as exc:
            self.fail_backlog(model, exc)
            return False
        if room is not None and room.wait_for:
            for blocker in room.wait_for:
                self.holds[blocker.name] = min(self.holds.get(blocker.name, first), first)
            return False
        for other in room.unload if room is not None else []:
            self.unload(other, f"to make room for '{model.name}'")
        self.holds.clear()
        return self.try_load(model, weighed=True, on_demand=True)

    def _weigh(self, model: ServedModel) -> None:
        """Its weights' size before its first load, from the files; ModelTooLarge if they
        alone pass the memory budget."""
        if not model.loads:
            model.weight_bytes = weights_on_disk(resolve_model_path(model.spec.source))
        if self.memory_budget:
            room_for(model, [], self.memory_budget, 0)

    def try_load(self, model: ServedModel, weighed: bool = False, on_demand: bool = False) -> bool:
        try:
            self.load(model, weighed, on_demand)
        except Exception as exc:
            self.fail_backlog(model, exc)
            return False
        return True

    def fail_backlog(self, model: ServedModel, exc: Exception) -> None:
        while model.backlog:
            job = model.backlog.popleft()
            job.emit(exc)
            job.emit(self._done)

    def load(self, model: ServedModel, weighed: bool = False, on_demand: bool = False) -> None:
        """Load the model's engine, decide how its requests run, start its prefetch (its
        weights measured against the budget first, unless `make_room_and_load` just did).
        `on_demand`: work waits for it (not the start-up's loads)."""
        model.state, model.load_error, started = LOADING, None, time.perf_counter()
        log.info("loading model %s", model.name)
        times = PhaseTimes()

        def progress(phase: str) -> None:
            model.phase = phase
            times.start(phase)
            log.info("%s: %s", model.name, phase)

        try:
            if not weighed:
                self._weigh(model)
            if model.name in self._closing:
                times.start("its last unload's writes")
                self.wait_for_writes(name=model.name)
            engine = self._load_engine(model.spec, model.prefill_chunk, progress, model.engine)
            progress("measuring batched decode")
            model.mode = self._decide_mode(model, engine, on_demand)
            faults.install_from_env(engine.model)  # after the check: it feeds random tokens
        except Exception as exc:
            model.state, model.phase = FAILED, None
            model.load_error = " ".join(f"{type(exc).__name__}: {exc}".split())
            log.error("could not load the model %s: %s", model.name, model.load_error)
            log.debug("the model's load failed here", exc_info=True)
            raise
        model.engine, model.prefill_chunk = engine, engine.prefill_chunk
        if self._disk_hold is None and (holder := retain(engine.store.disk)) is not None:
            self._disk_hold = (engine.store.disk, holder)
        model.weight_bytes = engine.weight_bytes or model.weight_bytes
        self._new_scheduler(model, engine)
        model.state, model.phase, model.loads = LOADED, None, model.loads + 1
        model.load_seconds = round(time.perf_counter() - started, 3)
        model.last_used = time.monotonic()
        log.info("model %s loaded in %.1f s (%s)", model.name, model.load_seconds, times.end())
        if self.prefetch > 0:  # planned beside the MLX thread: a large index takes a while to walk
            planner = threading.Thread(target=self._plan_prefetch, args=(model, engine, on_demand),
                                       name="kvtier-prefetch")
            self._planners.append(planner)
            planner.start()

    def unload(self, model: ServedModel, why: str) -> None:
        """Close the model's scheduler and engine: its hot KV goes to disk, its memory back."""
        log.info("unloading model %s (%s)", model.name, why)
        times = PhaseTimes()
        times.start("prefetch plans")
        for planner in self._planners:
            planner.join()  # a prefetch plan reads the index the store closes
        self._planners = []
        times.start("scheduler")
        scheduler, model.scheduler = model.scheduler, None
        self._probes.pop(model.name, None)  # a probe begun at idle starts over at the next load
        self._prefetches.pop(model.name, None)
        if scheduler is not None:
            scheduler.close()
        del scheduler  # its generator holds the model: gone before the engine's close collects
        if model.engine is not None:
            times.start("closing")
            # Its hot KV still queued for disk is written meanwhile; its weights are released now.
            closing = model.engine.close_soon()
            if closing is not None:
                self._closing[model.name] = closing
        model.state = UNLOADED
        log.info("model %s unloaded in %.2f s (%s)", model.name, times.seconds, times.end())

    def unload_expired(self) -> None:
        for model in expired(list(self.models.values()), self.keep_alive, time.monotonic()):
            self.unload(model, f"idle longer than the keep-alive ({self.keep_alive:g} s)")

    def _decide_mode(self, model: ServedModel, engine: Engine, on_demand: bool = False) -> str:
        """Batch wherever mlx-lm can merge the model's cache (the probe's verdict goes to
        /health); interleave where it cannot, where the probe could not measure, and, with
        `--exact`, where batched decode is not bit-identical. `--max-batch 1`: one row.
        Measured at the model's first load on this machine (kept in the cache directory:
        a restart recalls it); a reload keeps the verdict. Without `--exact` the verdict only
        informs /health: a load on demand (work waits for it) leaves it to the daemon's idle time."""
        if self.max_batch <= 1:
            model.batching = Exactness(True, "--max-batch 1: one request at a time, decoding alone")
            return ONE_AT_A_TIME
        if model.batching is None and (recalled := recall_exactness(engine, engine.store.config.cache_dir)):
            log.info("%s: batched decode's verdict recalled from %s (measured at an earlier load)", model.name,
                     engine.store.config.cache_dir)
            model.batching = recalled
        if model.batching is None and on_demand and self._can_measure_later(engine):
            model.measure_when_idle = True
            log.info("%s: continuous batching on, up to %d requests; batched decode is measured once the daemon "
                     "is idle", model.name, self.max_batch)
            return BATCHED
        if model.batching is None:
            model.batching = self._measure(model, engine)
        batching = model.batching
        if batching.exact or (not self.exact and batching.max_difference is not None):
            log.info("%s: continuous batching on, up to %d requests: %s", model.name, self.max_batch, batching.reason)
            return BATCHED
        log.warning("%s: requests interleave (up to %d, each decoding its own row) instead of batching: %s",
                    model.name, self.max_batch, batching.reason)
        return INTERLEAVED

    def _can_measure_later(self, engine: Engine) -> bool:
        """Without --exact, a batchable model's mode does not wait for the probe's verdict:
        the work waiting for the load need not either."""
        return not self.exact and unbatchable_reason(engine) is None

    def _measure(self, model: ServedModel, engine: Engine) -> Exactness:
        try:
            return measure_and_keep(engine, engine.store.config.cache_dir)
        except Exception as exc:
            return _probe_failed(model, exc)

    def idle_work(self) -> bool:
        """Whether a loaded model has work left for the idle time (idle_step)."""
        return bool(self._prefetches) or any(m.measure_when_idle and not m.running for m in self.loaded())

    def idle_step(self) -> bool:
        """One piece of the idle time's work: a model's first prefetch slice (the next ones are
        queued as jobs), else a piece of a batched-decode probe. True if a piece ran."""
        while self._prefetches:
            name, engine = self._prefetches.popitem()
            if any(m.engine is engine for m in self.loaded()):
                self._prefetch_step(engine)
                return True
        return self.measure_when_idle()

    def measure_when_idle(self) -> bool:
        """Run one piece of a loaded model's probe left for the idle time (on the MLX thread,
        nothing running; work that arrives meanwhile waits for that piece only, then the probe
        goes on at the next idle moment); a probe that fails makes its requests interleave
        from then on. True if a piece ran."""
        model = next((m for m in self.loaded() if m.measure_when_idle and not m.running), None)
        if model is None or model.engine is None or model.scheduler is None:
            return False
        engine = model.engine
        started, probe = self._probes.setdefault(model.name, (time.perf_counter(), exactness.measuring(engine)))
        try:
            log.debug("%s: a piece of the batched-decode probe", model.name)
            next(probe)
            return True
        except StopIteration as done:
            model.batching = exactness.keep(engine, engine.store.config.cache_dir, done.value)
        except Exception as exc:
            model.batching = _probe_failed(model, exc)
        del self._probes[model.name]
        model.measure_when_idle = False
        log.info("%s: batched decode measured while idle in %.2f s: %s", model.name, time.perf_counter() - started,
                 model.batching.reason)
        if model.batching.max_difference is None:  # could not measure: as at a load, interleave
            model.mode = INTERLEAVED
            self._new_scheduler(model, engine)
        model.scheduler.join_rests = joins_rests(model)  # the verdict decides it for a batched one too
        return True

    def _new_scheduler(self, model: ServedModel, engine: Engine) -> None:
        """The model's scheduler for its mode and verdict, counting into the model's stats."""
        model.scheduler = Scheduler(engine, self.max_batch, self._done, model.mode, join_rests=joins_rests(model))
        model.scheduler.stats = model.stats

    def _plan_prefetch(self, model: ServedModel, engine: Engine, on_demand: bool) -> None:
        """At start-up the prefetch begins at once (a restarted daemon's first request finds its
        blocks in RAM); for a model loaded on demand it begins in the idle time (the request it
        was loaded for reads from disk straight into its buffers, not after a slice)."""
        try:
            started = time.perf_counter()
            prefetch = engine.store.plan_prefetch(self.prefetch)
            log.info("%s: prefetch planned in %.2f s", model.name, time.perf_counter() - started)
            # Even with nothing planned (an empty cache): its one step ends it, so it says done.
            if not self._call_soon(self._prefetch_when_idle if on_demand else self._prefetch_step, model.name):
                prefetch.end("queue full")
        except Exception:  # no prefetch: requests read from disk as without one
            log.exception("planning the start-up prefetch failed")

    def _prefetch_when_idle(self, engine: Engine) -> None:
        """On the MLX thread: the planned prefetch's first slice waits for the idle time."""
        name = next((m.name for m in self.loaded() if m.engine is engine), None)
        if name is not None:
            self._prefetches[name] = engine

    def _prefetch_step(self, engine: Engine) -> None:
        """One slice of the prefetch; the next is queued behind what has arrived, so a request
        waits for one slice at most."""
        name = next((m.name for m in self.loaded() if m.engine is engine), None)
        if name is not None and engine.prefetch_step() and not self._call_soon(self._prefetch_step, name):
            assert engine.store.prefetch is not None  # it has just taken a step
            engine.store.prefetch.end("queue full")


def _probe_failed(model: ServedModel, exc: Exception) -> Exactness:
    """The verdict of a batched-decode probe that raised (logged with its traceback)."""
    log.error("%s: measuring batched decode failed", model.name, exc_info=exc)
    return Exactness(False, f"measuring batched decode failed: {exc}")


class PhaseTimes:
    """The seconds of each phase of a load or unload, for its one log line."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self._phases: list[tuple[str, float]] = []

    def start(self, phase: str) -> None:
        self._phases.append((phase, time.perf_counter()))

    def end(self) -> str:
        """"phase 0.10 s, next 0.02 s, ...": each phase until the next one starts, the last until now."""
        marks = [at for _, at in self._phases[1:]] + [time.perf_counter()]
        return ", ".join(f"{phase} {until - at:.2f} s" for (phase, at), until in zip(self._phases, marks))

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


def joins_rests(model: ServedModel) -> bool:
    """Short prompt rests are computed in the batch's pass (Scheduler.join_rests) where batched
    decode already differs from decoding alone: the probe measured that path too, and no
    exactness is lost where batched decode is bit-identical."""
    batching = model.batching
    return model.mode == BATCHED and batching is not None and not batching.exact and batching.max_difference is not None
