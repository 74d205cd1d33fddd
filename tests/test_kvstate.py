"""Cutting and rebuilding real mlx-lm prompt caches of every generated architecture."""

from __future__ import annotations

import mlx.core as mx
import pytest

from kvtier import kvstate
from tests.conftest import MODELS
from tests.support.testmodels import ARCHES, make_model


@pytest.fixture(scope="module", params=ARCHES)
def loaded(request):
    import mlx_lm

    return mlx_lm.load(str(make_model(MODELS / request.param, request.param)))


def logits_after(model, prompt_cache, token: int) -> mx.array:
    return model(mx.array([[token]]), cache=prompt_cache)[0, -1]


def test_rebuilt_cache_continues_exactly_like_the_live_one(loaded):
    model, _ = loaded
    tokens = mx.array([[(7 * i) % 200 + 3 for i in range(300)]])
    live = kvstate.make_cache(model)
    model(tokens, cache=live)
    plan, layout = kvstate.probe(model)
    blocks = [kvstate.slice_block(live, plan, s, min(s + 64, 300)) for s in range(0, 300, 64)]
    snapshot = kvstate.take_snapshot(live, plan) if plan.needs_snapshots else None
    rebuilt = kvstate.rebuild(model, plan, kvstate.PromptBuffers.of(layout, blocks), 300, snapshot)
    assert mx.array_equal(logits_after(model, rebuilt, 11), logits_after(model, live, 11))


def test_snapshots_do_not_alias_live_caches(loaded):
    """Sliding-window caches update their buffers in place; a snapshot taken before, and a
    cache rebuilt from it, must each keep their own arrays."""
    model, _ = loaded
    plan, layout = kvstate.probe(model)
    if not plan.needs_snapshots:
        pytest.skip("no snapshot layers in this architecture")
    live = kvstate.make_cache(model)
    model(mx.array([[5, 6, 7, 8]]), cache=live)
    logits_after(model, live, 9)  # a single-token step leaves room in the window buffer
    snapshot = kvstate.take_snapshot(live, plan)
    before = {k: mx.array(v) for k, v in snapshot.arrays.items()}
    blocks = [kvstate.slice_block(live, plan, 0, 5)]
    first = kvstate.rebuild(model, plan, kvstate.PromptBuffers.of(layout, blocks), 5, snapshot)
    expected = logits_after(model, kvstate.rebuild(model, plan, kvstate.PromptBuffers.of(layout, blocks), 5,
                                                   snapshot), 10)
    for token in (10, 11, 12):  # more single-token steps: written in place into that room
        logits_after(model, live, token)
        logits_after(model, first, token)
    assert all(mx.array_equal(before[k], v) for k, v in snapshot.arrays.items())
    second = kvstate.rebuild(model, plan, kvstate.PromptBuffers.of(layout, blocks), 5, snapshot)
    assert mx.array_equal(logits_after(model, second, 10), expected)


def _kv(n: int, seed: int) -> tuple[mx.array, mx.array]:
    key = mx.random.key(seed)
    return mx.random.normal((1, 2, n, 8), key=key), mx.random.normal((1, 2, n, 8), key=mx.random.split(key)[0])


def _fresh_layers():
    from mlx_lm.models import cache as c

    inner_arrays = c.ArraysCache(2)
    return [c.ChunkedKVCache(chunk_size=8), c.RotatingKVCache(max_size=6, keep=2),
            c.CacheList(c.KVCache(), inner_arrays)]


def _feed(layers, n: int, seed: int) -> None:
    for layer in layers[:2]:
        layer.update_and_fetch(*_kv(n, seed))
    pair = layers[2]
    pair[0].update_and_fetch(*_kv(n, seed))
    pair[1][0] = mx.full((1, 4), float(seed))
    pair[1][1] = mx.full((1, 3), float(seed + 1))


def test_every_other_cache_type_round_trips_through_its_state():
    """ChunkedKVCache, RotatingKVCache and CacheList (of KV + recurrent state) are restored
    from a snapshot to exactly the state they had, and then evolve exactly alike."""
    live = _fresh_layers()
    for seed, n in enumerate([5, 1, 1, 7, 1]):
        _feed(live, n, seed)
    plan = kvstate.plan_for(live)
    assert plan.snapshot == (0, 1, 2) and plan.sliced == ()
    snapshot = kvstate.take_snapshot(live, plan)
    restored = _fresh_layers()
    kvstate.restore_snapshot(restored, plan, snapshot)
    for seed, n in [(10, 1), (11, 3)]:
        _feed(live, n, seed)
        _feed(restored, n, seed)
    from mlx.utils import tree_flatten

    # mlx-lm before 0.32 keeps offsets and the ring position in meta_state: compared too
    ours = tree_flatten([(c.state, getattr(c, "meta_state", "")) for c in restored])
    theirs = tree_flatten([(c.state, getattr(c, "meta_state", "")) for c in live])
    assert [k for k, _ in ours] == [k for k, _ in theirs]
    for (_, a), (_, b) in zip(ours, theirs):
        assert mx.array_equal(a, b) if isinstance(a, mx.array) else a == b


def test_a_state_kvtier_cannot_store_is_refused():
    from mlx_lm.models import cache as c

    class Opaque(c.KVCache):
        @property
        def state(self):
            return (object(),)

    layers = [Opaque()]
    with pytest.raises(kvstate.UnsupportedCache):
        kvstate.take_snapshot(layers, kvstate.plan_for(layers))
