"""The memory policy over several models (daemon/models.py): which loaded models make room for
another, which it must wait for, which it can never fit beside, and the keep-alive."""

from __future__ import annotations

import pytest

from daemon.models import LOADED, Job, ModelTooLarge, ServedModel, expired, room_for
from kvtier.config import ModelSpec

MB = 2**20


def model(name: str, weights: int, loaded: bool = True, last_used: float = 0.0, pin: bool = False,
          waiting: list[int] | None = None) -> ServedModel:
    served = ServedModel(ModelSpec(f"/models/{name}", name=name, pin=pin), weight_bytes=weights * MB,
                         last_used=last_used)
    if loaded:
        served.state = LOADED
    for seq in waiting or []:
        served.backlog.append(Job(None, lambda item: None, seq))
    return served


def test_it_loads_beside_the_others_when_they_fit():
    room = room_for(model("new", 10, loaded=False), [model("a", 10), model("b", 10)], 40 * MB, before=5)
    assert room.unload == [] and room.wait_for == []


def test_the_least_recently_used_idle_models_make_room_and_no_more():
    old, older, recent = model("old", 10, last_used=2), model("older", 10, last_used=1), model("recent", 10, last_used=3)
    room = room_for(model("new", 15, loaded=False), [recent, old, older], 40 * MB, before=5)
    assert [m.name for m in room.unload] == ["older"]  # 30 - 10 + 15 = 35 <= 40


def test_a_pinned_model_is_never_unloaded():
    pinned, other = model("pinned", 20, last_used=0, pin=True), model("other", 10, last_used=5)
    room = room_for(model("new", 15, loaded=False), [pinned, other], 40 * MB, before=9)
    assert [m.name for m in room.unload] == ["other"]


def test_a_model_with_an_earlier_request_waiting_is_waited_for_not_unloaded():
    busy = model("busy", 20, waiting=[3])  # a request that arrived before the new model's (seq 5)
    room = room_for(model("new", 25, loaded=False), [busy], 40 * MB, before=5)
    assert room.unload == [] and [m.name for m in room.wait_for] == ["busy"]


def test_requests_that_arrived_after_the_waiting_model_do_not_keep_a_model_loaded():
    later = model("later", 20, waiting=[7])
    room = room_for(model("new", 25, loaded=False), [later], 40 * MB, before=5)
    assert [m.name for m in room.unload] == ["later"]


def test_a_model_that_cannot_fit_even_alone_is_refused_naming_the_sizes():
    with pytest.raises(ModelTooLarge, match=r"50\.0 MiB.*40\.0 MiB"):
        room_for(model("huge", 50, loaded=False), [], 40 * MB, before=0)


def test_a_model_that_cannot_fit_beside_the_pinned_ones_is_refused():
    with pytest.raises(ModelTooLarge, match="pinned"):
        room_for(model("new", 25, loaded=False), [model("pinned", 20, pin=True)], 40 * MB, before=0)


def test_the_keep_alive_unloads_idle_unpinned_models_only():
    idle, pinned, queued = model("idle", 1, last_used=0), model("pinned", 1, pin=True), model("queued", 1, waiting=[1])
    assert [m.name for m in expired([idle, pinned, queued], keep_alive=60, now=100)] == ["idle"]
    assert expired([idle], keep_alive=None, now=10**9) == []
    assert expired([idle], keep_alive=200, now=100) == []
