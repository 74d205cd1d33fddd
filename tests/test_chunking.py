"""The prefill chunk size (kvtier.chunking): timed once when the engine loads, a block
multiple in range, fixed for the process and the one every prefill cuts at; a given
`--prefill-step-size N` wins; answers stay plain mlx-lm's at that chunk size. Nothing here
asserts a time: which size the measurement picks depends on the machine."""

from __future__ import annotations

import pytest

from daemon.cli import build_parser, serve_config
from kvtier import chunking
from kvtier.scheduler import generate
from tests.conftest import TEST_BLOCK_SIZE, Reference
from tests.inprocess import InProcessDaemon

MAX_TOKENS = 6


def _prompt(reference: Reference, tokens: int) -> list[int]:
    """Token ids of ordinary text, longer than the largest chunk can be (so it is cut)."""
    text = " ".join(f"line {i}: the agent reads module {i % 17} and runs its tests." for i in range(tokens // 8))
    ids = reference.tokenizer.encode(text)
    assert len(ids) >= tokens
    return ids[:tokens]


@pytest.mark.parametrize("block_size", [64, 100, 128, 4096])
def test_the_candidates_are_block_multiples_within_the_range(block_size):
    sizes = chunking.block_multiples(block_size)
    assert sizes and all(s % block_size == 0 for s in sizes)
    if block_size <= chunking.MAX_TOKENS:
        assert chunking.MIN_TOKENS <= sizes[0] and sizes[-1] <= chunking.MAX_TOKENS
        assert sizes[-1] + block_size > chunking.MAX_TOKENS  # the largest one that fits
    else:  # a block larger than the range: the one block
        assert sizes == [block_size]


def test_the_pick_is_the_largest_chunk_that_fits_the_target_at_the_reference_depth():
    # 256 tokens take 0.05 s at depth 0 and 0.05 s more per 1,000 tokens of depth.
    fit = chunking.ChunkFit(256, intercept=0.05, slope=0.05 / 1000)
    chosen = chunking.pick(fit, 128, target=0.4, depth=4096)
    assert fit.seconds(chosen, 4096) <= 0.4 < fit.seconds(chosen + 128, 4096)
    fast = chunking.ChunkFit(256, intercept=0.01, slope=0.0)
    assert chunking.pick(fast, 128, target=0.4, depth=8192) == 2048  # a fast model: the ceiling
    assert chunking.pick(fit, 128, target=0.01, depth=8192) == 128  # nothing fits: the floor


def test_a_noisy_timing_moves_the_fit_little():
    depths = list(range(0, 2048, 256))
    seconds = [0.05 + 0.0001 * d for d in depths]
    seconds[3] *= 6  # another process took the cores for one chunk
    fit = chunking._fit_line(256, depths, seconds)
    assert fit.slope == pytest.approx(0.0001, rel=0.05)
    assert fit.intercept == pytest.approx(0.05, rel=0.05)


def test_the_start_up_measurement_stops_early_past_its_time_budget(tiny_model):
    """A big model on a slow machine must not hold the start-up for minutes: past the budget
    the fit is made from the chunks timed so far (two at least)."""
    from mlx_lm import load

    model, _ = load(str(tiny_model))
    never = float("inf")  # no chunk is slower than this target
    assert chunking.measure(model, 256, depth=2048, budget=0.0, target=never).points == 2
    assert chunking.measure(model, 256, depth=2048, budget=600.0, target=never).points == 2048 // 256
    # The first chunk slower than the target: no deeper one can fit, the smallest size it is.
    slow = chunking.measure(model, 256, depth=2048, budget=600.0, target=0.0)
    assert slow.points == 1 and chunking.pick(slow, 128, target=0.0) == 128


def test_a_measured_chunk_is_what_every_prefill_cuts_at_with_plain_mlx_lm_s_numbers(tiny_model, tmp_path,
                                                                                    monkeypatch):
    """Engine(prefill_step_size=None) times the model, keeps a block multiple in range, and
    prefills a cold prompt in exactly those chunks: the log-probabilities are, bit for bit,
    plain mlx-lm's `generate_step` run with that `prefill_step_size`. The range is narrowed
    below mlx-lm's default 2,048, so a prefill cutting anywhere else shows on any machine."""
    monkeypatch.setattr(chunking, "MAX_TOKENS", 512)
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from kvtier.config import CacheConfig
    from kvtier.engine import Engine
    from kvtier.requests import GenerationRequest

    engine = Engine(str(tiny_model), CacheConfig(cache_dir=tmp_path, block_size=TEST_BLOCK_SIZE),
                    prefill_step_size=None)
    try:
        chunk = engine.prefill_chunk
        assert chunk.chosen == "measured" and chunk.probe_seconds is not None
        assert chunk.tokens in chunking.block_multiples(TEST_BLOCK_SIZE) and chunk.tokens <= 512
        assert engine.prefill_step_size == chunk.tokens
        reference = Reference(tiny_model)
        tokens = _prompt(reference, 3 * 512 + 77)
        cuts: list[int] = []
        request = GenerationRequest(tokens, MAX_TOKENS, temperature=0.0, logprobs=0,
                                    progress=lambda done, total: cuts.append(done))
        entries = [e for c in generate(engine, request) for e in getattr(c, "logprobs", [])]
    finally:
        engine.close()
    end = len(tokens) - 1
    assert cuts == [*range(chunk.tokens, end, chunk.tokens), end]
    expected = [(int(t), row) for t, row in generate_step(mx.array(tokens), reference.model, max_tokens=MAX_TOKENS,
                                                         prefill_step_size=chunk.tokens)]
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
        assert chunk["chosen"] == "measured" and chunk["tokens"] in chunking.block_multiples(TEST_BLOCK_SIZE)
        assert chunk["seconds_at_reference"] > 0 and chunk["reference_depth"] == chunking.REFERENCE_DEPTH
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
