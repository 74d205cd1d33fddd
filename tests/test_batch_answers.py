"""A request's greedy answer does not depend on its neighbours, nor on where its prefix came
from (issue 33): through the app `kvtier serve` runs in its default configuration (requests
batched), the same answer alone, in a batch of 2, 4 and 8 beside different neighbours, with
its prompt computed in the batch, restored from RAM and restored from SSD.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from daemon.state import STATE
from kvtier.engine import Engine
from kvtier.scheduler import BatchStats
from tests.conftest import MODELS, Reference
from tests.inprocess import InProcessDaemon
from tests.support.testmodels import make_model

MAX_TOKENS = 12
TARGET = [{"role": "user", "content": "Which tier does a block come from after a restart? " * 3}]


def _neighbours(width: int) -> list[list[dict]]:
    """Conversations of other lengths than the target's (their rows are padded differently)."""
    return [[{"role": "user", "content": f"Neighbour {width}.{i}: " + "spill the hot blocks. " * (1 + 5 * i)}]
            for i in range(width - 1)]


def _ask(daemon: InProcessDaemon, messages: list[dict]) -> tuple[str | None, int]:
    """The greedy answer and the prompt tokens it had from the cache."""
    response = daemon.client().chat.completions.create(model=str(daemon.model), messages=messages,
                                                       max_tokens=MAX_TOKENS, temperature=0)
    assert response.usage is not None and response.usage.prompt_tokens_details is not None
    return response.choices[0].message.content, response.usage.prompt_tokens_details.cached_tokens or 0


def _stats(daemon: InProcessDaemon) -> BatchStats:
    scheduler = daemon.app[STATE].worker.batch
    assert scheduler is not None  # running once the model is loaded
    return scheduler.stats


def _at_once(daemon: InProcessDaemon, conversations: list[list[dict]]) -> list[tuple[str | None, int]]:
    """Ask them together; checks that decode steps carried several rows (they batched)."""
    stats = _stats(daemon)
    tokens, steps = stats.decode_tokens, stats.decode_steps
    with ThreadPoolExecutor(len(conversations)) as pool:
        answers = list(pool.map(lambda m: _ask(daemon, m), conversations))
    assert stats.decode_tokens - tokens > stats.decode_steps - steps, "the requests never shared a step"
    return answers


def _forget_hot(engine: Engine) -> None:
    """Every block written to disk, then RAM and the live caches dropped: restores read SSD."""
    engine.store.wait_for_writes()
    engine.store.forget_hot()


@pytest.mark.parametrize("arch, flags", [("llama", ()), ("qwen3_next", ()), ("sliding", ()), ("llama", ("--kv-bits", "8"))],
                         ids=["llama", "qwen3_next", "sliding", "llama-kv8"])
def test_an_answer_is_the_same_alone_beside_any_neighbours_and_from_any_tier(arch, flags, tmp_path):
    model = make_model(MODELS / arch, arch)
    daemon = InProcessDaemon(model, tmp_path / "cache", "--max-batch", "8", *flags).start()
    try:
        computed_in_batch, cached = _at_once(daemon, [TARGET, *_neighbours(2)])[0]
        assert cached == 0
        alone, cached = _ask(daemon, TARGET)  # its prefix from RAM (the live cache)
        assert cached > 0 and alone == computed_in_batch
        if not flags:  # plain mlx-lm decodes with a full-precision cache only
            assert alone == Reference(model).chat(TARGET, MAX_TOKENS)
        for width in (4, 8):  # from RAM, beside new neighbours
            answer, cached = _at_once(daemon, [TARGET, *_neighbours(width)])[0]
            assert cached > 0 and answer == alone, width
        daemon._run(daemon.app[STATE].worker.call(_forget_hot))
        from_disk = daemon.app[STATE].engine().store.counters.get("tokens_from_disk", 0)
        answer, cached = _at_once(daemon, [TARGET, *_neighbours(4)])[0]
        assert daemon.app[STATE].engine().store.counters["tokens_from_disk"] > from_disk  # read from SSD
        assert cached > 0 and answer == alone
    finally:
        daemon.stop()


def test_max_batch_1_is_a_scheduler_of_one(llama_model, tmp_path, reference):
    """`--max-batch 1`: requests sent together are served one after the other, each decoding
    alone (plain mlx-lm's arithmetic): /health says so, and the answers are mlx-lm's."""
    daemon = InProcessDaemon(llama_model, tmp_path / "cache", "--max-batch", "1").start()
    try:
        batching = daemon.get("/health")["batching"]
        assert (batching["mode"], batching["exact"], batching["max_batch"]) == ("one at a time", True, 1)
        conversations = [TARGET, *_neighbours(3)]
        with ThreadPoolExecutor(len(conversations)) as pool:
            answers = list(pool.map(lambda m: _ask(daemon, m)[0], conversations))
        assert answers == [reference.chat(m, MAX_TOKENS) for m in conversations]
        stats = _stats(daemon)
        assert stats.decode_tokens == stats.decode_steps  # never two rows in a step
    finally:
        daemon.stop()


def test_batch_inexact_is_still_accepted_and_says_it_is_the_default(caplog):
    """Installed services started with --batch-inexact (batching's old opt-in) keep starting."""
    from daemon.cli import build_parser, serve_config

    with caplog.at_level("WARNING", logger="kvtier"):
        config = serve_config(build_parser().parse_args(["serve", "--model", "m", "--batch-inexact"]))
    assert not config.exact
    assert [r.getMessage() for r in caplog.records] == [
        "--batch-inexact is the default now: requests batch unless --exact is given"]
    assert serve_config(build_parser().parse_args(["serve", "--model", "m", "--exact"])).exact


def test_a_wide_model_batches_bit_identically_even_with_exact(tmp_path):
    """At hidden 2048 OpenBLAS's projections do not depend on the row count, and per-row
    attention (installed before the start-up check) removes the padding's effect: the check
    finds batched decode bit-identical, so even --exact batches, and answers are mlx-lm's."""
    model = make_model(MODELS / "llama-2048x2", "llama", hidden=2048, layers=2)
    daemon = InProcessDaemon(model, tmp_path / "cache", "--max-batch", "4", "--exact").start()
    try:
        batching = daemon.get("/health")["batching"]
        assert (batching["mode"], batching["exact"], batching["max_logprob_difference"]) == ("batched", True, 0.0)
        assert not batching["batched_prefill"]  # prompts prefilled alone: their numbers stay exact
        conversations = [TARGET, *_neighbours(4)]
        answers = [answer for answer, _ in _at_once(daemon, conversations)]
        reference = Reference(model)
        assert answers == [reference.chat(m, MAX_TOKENS) for m in conversations]
    finally:
        daemon.stop()
