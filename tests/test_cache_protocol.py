"""kvtier keeps to mlx-lm's cache protocol on every mlx-lm it supports (`make test-oldest` runs
this file on the lowest one): a snapshot stores `state` and, where mlx-lm has it, `meta_state`
(RotatingKVCache's offset and ring position before mlx-lm 0.32), and restores both through
the caches' own setters."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten

from kvtier import kvstate
from kvtier.disk import decode_block, encode_block
from tests.conftest import MODELS
from tests.support.testmodels import make_model

PROMPT = [(7 * i) % 200 + 3 for i in range(300)]  # past the sliding window (128)
CACHED = 290  # restored from blocks + a snapshot; the rest is the prompt still to prefill


@pytest.fixture(scope="module", params=["sliding", "qwen3_next", "mamba2"])
def loaded(request):
    return mlx_lm.load(str(make_model(MODELS / request.param, request.param)))


def _live_cache(model):
    """A cache as a request leaves it: a long prefill, then single-token steps, which write
    into a sliding window's ring in place (its offset and write position part ways)."""
    live = kvstate.make_cache(model)
    model(mx.array([PROMPT[: CACHED - 4]]), cache=live)
    for token in PROMPT[CACHED - 4 : CACHED]:
        model(mx.array([[token]]), cache=live)
    mx.eval(kvstate.state_arrays(live))
    return live


def _through_a_file(snapshot: kvstate.Snapshot) -> kvstate.Snapshot:
    """The snapshot as a restarted daemon reads it back from its block file."""
    payload = encode_block(snapshot.arrays, np.array(PROMPT[:CACHED]), {"skeleton": snapshot.skeleton})
    arrays, _, metadata = decode_block(payload)
    return kvstate.Snapshot(arrays, metadata["skeleton"])


def _restored(model, live):
    plan, layout = kvstate.probe(model)
    blocks = [kvstate.slice_block(live, plan, s, min(s + 64, CACHED)) for s in range(0, CACHED, 64)]
    buffers = kvstate.PromptBuffers.of(layout, blocks, capacity=len(PROMPT) + 1)
    snapshot = _through_a_file(kvstate.take_snapshot(live, plan))
    return plan, kvstate.rebuild(model, plan, buffers, CACHED, snapshot)


def _whole_state(layer):
    """What mlx-lm itself saves of a layer (save_prompt_cache): state, and meta_state if any."""
    return tree_flatten({"state": layer.state, "meta_state": getattr(layer, "meta_state", "")})


def test_restored_snapshot_layers_equal_the_live_ones_state_and_meta_state(loaded):
    model, _ = loaded
    live = _live_cache(model)
    plan, restored = _restored(model, live)
    assert plan.needs_snapshots
    for i in plan.snapshot:
        ours, theirs = _whole_state(restored[i]), _whole_state(live[i])
        assert [k for k, _ in ours] == [k for k, _ in theirs], plan.classes[i]
        for (name, a), (_, b) in zip(ours, theirs):
            same = mx.array_equal(a, b).item() if isinstance(a, mx.array) else a == b
            assert same, f"layer {i} ({plan.classes[i]}): {name} differs"
    for i in plan.sliced:
        assert kvstate.cached_tokens([restored[i]]) == CACHED


def test_generation_from_a_restored_cache_equals_plain_mlx_lm(loaded):
    model, tokenizer = loaded
    _, restored = _restored(model, _live_cache(model))
    ours = mlx_lm.generate(model, tokenizer, prompt=PROMPT[CACHED:], prompt_cache=restored, max_tokens=12)
    assert ours == mlx_lm.generate(model, tokenizer, prompt=PROMPT, max_tokens=12)


def test_a_snapshot_of_another_format_or_mlx_lm_is_a_miss(loaded):
    """State layouts change between mlx-lm versions (0.32 folded meta_state into state), and
    snapshots written before meta_state was stored lack it: either kind must be a miss."""
    model, _ = loaded
    plan, _ = kvstate.probe(model)
    skeleton = json.loads(kvstate.take_snapshot(_live_cache(model), plan).skeleton)
    assert kvstate.snapshot_matches(json.dumps(skeleton), plan)
    old_format = {k: v for k, v in skeleton.items() if k not in ("format", "mlx_lm")}
    assert not kvstate.snapshot_matches(json.dumps(old_format), plan)
    assert not kvstate.snapshot_matches(json.dumps(dict(skeleton, mlx_lm="0.0.1")), plan)
