"""The prefill chunks (kvtier.chunking): timed once when the engine loads, their size shrinks
with depth so a deep chunk takes no longer than a shallow one, and cuts depend on positions
only; a given `--prefill-step-size N` wins; answers stay plain mlx-lm's cut at the same
places. Nothing here asserts a time: which sizes the measurement picks depends on the machine."""

from __future__ import annotations

import mlx.core as mx
import pytest

from daemon.cli import build_parser, serve_config
from kvtier import chunking
from kvtier.config import DEFAULT_BLOCK_SIZE
from kvtier.scheduler import generate
from tests.conftest import TEST_BLOCK_SIZE, Reference
from tests.inprocess import InProcessDaemon
from tests.test_docs import _serve_options

MAX_TOKENS = 6


def _prompt(reference: Reference, tokens: int) -> list[int]:
    """Token ids of ordinary text, longer than the largest chunk can be (so it is cut)."""
    text = " ".join(f"line {i}: the agent reads module {i % 17} and runs its tests." for i in range(tokens // 8))
    ids = reference.tokenizer.encode(text)
    assert len(ids) >= tokens
    return ids[:tokens]


@pytest.mark.parametrize("block_size", [64, 100, 128, 4096])
def test_the_candidates_are_the_block_doubled_and_halved_each_dividing_the_larger(block_size):
    sizes = chunking.chunk_sizes(block_size)
    assert block_size in sizes and sizes == sorted(sizes)
    assert all(larger % smaller == 0 for smaller, larger in zip(sizes, sizes[1:]))
    assert sizes[0] >= chunking.MIN_PART_TOKENS and sizes[-1] <= max(block_size, chunking.MAX_TOKENS)
    if block_size <= chunking.MAX_TOKENS:
        assert sizes[-1] * 2 > chunking.MAX_TOKENS  # the largest one that fits
    assert chunking.chunk_sizes(128) == [16, 32, 64, 128, 256, 512, 1024, 2048]
    assert chunking.chunk_sizes(100) == [25, 50, 100, 200, 400, 800, 1600]


def test_a_chunk_is_the_largest_that_fits_the_target_at_its_depth():
    # 256 tokens take 0.05 s at depth 0 and 0.05 s more per 1,000 tokens of depth.
    fit = chunking.ChunkFit(256, intercept=0.05, slope=0.05 / 1000)
    chunk = chunking.PrefillChunk(256, "measured", fit=fit, sizes=tuple(chunking.chunk_sizes(128)), target=0.4)
    sizes = [chunk.size_at(depth) for depth in (0, 2048, 8192, 65536)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 128 > sizes[-1]  # whole blocks, then parts
    for depth, size in zip((0, 2048, 8192), sizes):
        assert fit.seconds(size, depth) <= 0.4 < fit.seconds(2 * size, depth)
    fast = chunking.PrefillChunk(256, "measured", fit=chunking.ChunkFit(256, 0.01, 0.0), sizes=(16, 128, 2048))
    assert fast.size_at(8192) == 2048  # a fast model: the ceiling
    assert chunk.size_at(10**9) == 16  # nothing fits: the floor
    assert chunking.PrefillChunk(320, "--prefill-step-size").size_at(10**6) == 320  # fixed: one size


def test_cuts_fall_on_multiples_of_the_chunk_so_a_block_aligned_start_cuts_where_a_cold_prompt_does():
    fit = chunking.ChunkFit(128, intercept=0.05, slope=0.2 / 1000)
    chunk = chunking.PrefillChunk(128, "measured", fit=fit, sizes=tuple(chunking.chunk_sizes(128)), target=0.3)
    assert chunk.size_at(4096) < 128

    def cuts(start: int, end: int) -> list[int]:
        found = []
        while start < end:
            start = min(chunk.next_cut(start), end)
            found.append(start)
        return found

    cold = cuts(0, 6000)
    assert cuts(4096, 6000) == [c for c in cold if c > 4096]


def test_a_noisy_timing_moves_the_fit_little():
    depths = list(range(0, 2048, 256))
    seconds = [0.05 + 0.0001 * d for d in depths]
    seconds[3] *= 6  # another process took the cores for one chunk
    fit = chunking._fit_line(256, depths, seconds)
    assert fit.slope == pytest.approx(0.0001, rel=0.05)
    assert fit.intercept == pytest.approx(0.05, rel=0.05)


def test_the_probe_times_each_depth_over_random_keys_and_stops_when_a_chunk_is_already_too_slow(tiny_model):
    """A few chunks, not a prefill: a model loaded on demand makes its first request wait for
    it. Past the target at depth 0, no deeper chunk can fit: it stops there (a flat fit)."""
    from mlx_lm import load
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    model, _ = load(str(tiny_model))
    never = float("inf")  # no chunk is slower than this target
    fit = chunking.measure(model, 64, depths=(0, 1024, 2048), target=never)
    assert fit.points == 3 and fit.slope >= 0
    slow = chunking.measure(model, 64, target=0.0)
    assert slow.points == 1 and slow.slope == 0
    assert chunking.largest_fitting(slow, [64, 128], 0, target=0.0) == 64
    cache = make_prompt_cache(model)
    model(mx.array([[1, 2, 3]]), cache=cache)
    assert chunking._deepen(cache, 1000, room=128) == sum(type(c) is KVCache for c in cache) > 0
    assert {c.offset for c in cache} == {1000}
    kv = [c for c in cache if type(c) is KVCache]
    assert {c.keys.shape[2] for c in kv} == {1128}  # a timed chunk of 128 tokens grows no buffer
    model(mx.arange(128)[None] % 64 + 1, cache=cache)
    assert {c.keys.shape[2] for c in kv} == {1128} and {c.offset for c in cache} == {1128}


def test_the_engine_times_the_model_when_no_size_is_given(tiny_model, tmp_path):
    from kvtier.config import CacheConfig
    from kvtier.engine import Engine

    engine = Engine(str(tiny_model), CacheConfig(cache_dir=tmp_path, block_size=TEST_BLOCK_SIZE),
                    prefill_step_size=None)
    try:
        chunk = engine.prefill_chunk
        assert chunk.chosen == "measured" and chunk.probe_seconds is not None and chunk.fit is not None
        assert chunk.tokens in chunking.chunk_sizes(TEST_BLOCK_SIZE) and engine.prefill_step_size == chunk.tokens
        assert chunk.tokens_at_reference is not None and chunk.tokens_at_reference <= chunk.tokens
    finally:
        engine.close()


def test_a_prefill_cuts_where_its_chunks_say_with_plain_mlx_lm_s_numbers(tiny_model, tmp_path):
    """A chunk schedule that shrinks from 4 blocks to half a block within the prompt (a fit
    given, not timed, so the cuts are known): the engine prefills in exactly those chunks, and
    the log-probabilities are, bit for bit, plain mlx-lm's prefilled at the same cuts."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    from kvtier.config import CacheConfig
    from kvtier.engine import Engine
    from kvtier.requests import GenerationRequest

    fit = chunking.ChunkFit(64, intercept=0.01, slope=0.1 / 1000)
    schedule = chunking.PrefillChunk(256, "measured", fit=fit, sizes=(16, 32, 64, 128, 256, 512), target=0.1)
    engine = Engine(str(tiny_model), CacheConfig(cache_dir=tmp_path, block_size=TEST_BLOCK_SIZE),
                    prefill_step_size=schedule)
    reference = Reference(tiny_model)
    tokens = _prompt(reference, 3 * 512 + 77)
    cuts: list[int] = []
    try:
        assert engine.prefill_chunk is schedule
        request = GenerationRequest(tokens, MAX_TOKENS, temperature=0.0, logprobs=0,
                                    progress=lambda done, total: cuts.append(done))
        entries = [e for c in generate(engine, request) for e in getattr(c, "logprobs", [])]
    finally:
        engine.close()
    sizes = {b - a for a, b in zip([0, *cuts], cuts)}
    assert max(sizes) == 256 and min(sizes) < TEST_BLOCK_SIZE  # whole blocks first, parts of one deep
    assert all(cut % min(schedule.size_at(at), TEST_BLOCK_SIZE) == 0 for at, cut in zip([0, *cuts], cuts[:-1]))
    cache, at = make_prompt_cache(reference.model), 0
    for cut in cuts:
        reference.model(mx.array(tokens[at:cut])[None], cache=cache)
        at = cut
    expected = [(int(t), row) for t, row in generate_step(mx.array(tokens[at:]), reference.model,
                                                         max_tokens=MAX_TOKENS, prompt_cache=cache)]
    assert [e.logprob for e in entries] == [row[t].item() for t, row in expected]


def test_a_given_prefill_step_size_wins_and_health_says_which(tiny_model, tmp_path):
    fixed = InProcessDaemon(tiny_model, tmp_path / "fixed", "--prefill-step-size", "320").start()
    try:
        health = fixed.get("/health")
        assert health["prefill_chunk"]["tokens"] == 320
        assert health["prefill_chunk"]["chosen"] == "--prefill-step-size"
    finally:
        fixed.stop()
    measured = InProcessDaemon(tiny_model, tmp_path / "auto", "--prefill-step-size", "auto").start()
    try:
        chunk = measured.get("/health")["prefill_chunk"]
        assert chunk["chosen"] == "measured" and chunk["tokens"] in chunking.chunk_sizes(TEST_BLOCK_SIZE)
        assert chunk["seconds_at_reference"] > 0 and chunk["reference_depth"] == chunking.REFERENCE_DEPTH
        assert chunk["tokens_at_reference"] in chunking.chunk_sizes(TEST_BLOCK_SIZE)
    finally:
        measured.stop()


def test_the_option_defaults_to_auto_and_refuses_a_size_that_is_no_positive_number(capsys):
    parse = build_parser().parse_args
    assert serve_config(parse(["serve", "--model", "m"])).prefill_step_size is None
    assert serve_config(parse(["serve", "--model", "m", "--prefill-step-size", "384"])).prefill_step_size == 384
    for bad in ("0", "-5", "big"):
        with pytest.raises(SystemExit) as exit_:
            parse(["serve", "--model", "m", "--prefill-step-size", bad])
        assert exit_.value.code == 2
        assert "--prefill-step-size" in capsys.readouterr().err


def test_serve_help_states_the_chunk_sizes_auto_picks_from():
    """It said 128-2048 while deep chunks go down to 16 tokens."""
    sizes = chunking.chunk_sizes(DEFAULT_BLOCK_SIZE)
    (step,) = [a for a in _serve_options() if "--prefill-step-size" in a.option_strings]
    assert step.help and f": {sizes[0]}-{sizes[-1]}," in step.help
