"""An idle daemon's first request waits GATHER_SECONDS for the requests sent with it, so an
agent's parallel calls are admitted together (prefilled in one step, their first tokens from
one pass) instead of behind the first one's lone step; a busy daemon takes what is queued."""

from __future__ import annotations

import queue
from typing import Any

from daemon.worker import Worker
from kvtier.config import ModelSpec
from kvtier.engine import Engine
from kvtier.requests import GenerationRequest


class ArrivesWhileWaited(queue.Queue):
    """A queue whose `later` items arrive only for a caller that waits (a blocking get with a
    timeout): as a request sent a few ms after another reaches the queue."""

    def __init__(self, later: list) -> None:
        super().__init__()
        self.later = later

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if block and timeout and self.later:
            self.put(self.later.pop(0))
        return super().get(block, timeout)


def _job(tokens: list[int]) -> tuple[str, GenerationRequest, object]:
    return "m", GenerationRequest(tokens, 4, temperature=0.0), lambda item: None


def _never_loads(*args: Any) -> Engine:
    raise AssertionError("the worker is never started: no model loads")


def _worker(first: list, later: list) -> Worker:
    worker = Worker(_never_loads, [ModelSpec("m")])
    worker._jobs = ArrivesWhileWaited(later)
    for job in first:
        worker._jobs.put(job)
    return worker


def test_requests_arriving_just_after_an_idle_daemons_first_are_admitted_with_it():
    worker = _worker([_job([1, 2, 3])], later=[_job([4, 5]), _job([6])])
    assert not worker._take_jobs(block=True)
    assert [job.work.prompt_tokens for job in worker.models["m"].backlog] == [[1, 2, 3], [4, 5], [6]]


def test_a_busy_daemon_takes_what_is_queued_without_waiting():
    later = [_job([4, 5])]
    worker = _worker([_job([1, 2, 3])], later=later)
    assert not worker._take_jobs(block=False)  # between two steps of running requests
    assert [job.work.prompt_tokens for job in worker.models["m"].backlog] == [[1, 2, 3]]
    assert later  # nobody waited for it
