"""Live caches: a finished request's prompt cache kept whole, taken over by the next turn that
shares its prefix (trimmed back to it, no buffers, no block copy), exact against plain mlx-lm;
dropped under memory pressure, on a purge, and never kept from a failed request."""

from __future__ import annotations

import pytest

from kvtier.config import CacheConfig
from kvtier.engine import Engine
from kvtier.requests import GenerationRequest
from kvtier.scheduler import generate
from tests.conftest import MODELS, TEST_BLOCK_SIZE, Reference, agent_messages
from tests.support.testmodels import make_model

MAX_TOKENS = 12


def make_engine(model, tmp_path, **config) -> Engine:
    return Engine(str(model), CacheConfig(cache_dir=tmp_path / "cache", block_size=TEST_BLOCK_SIZE, **config))


def run(engine: Engine, tokens: list[int], max_tokens: int = MAX_TOKENS):
    chunks = list(generate(engine, GenerationRequest(list(tokens), max_tokens, temperature=0.0)))
    return "".join(c.text for c in chunks), chunks[-1].usage


def follow_up(reference: Reference, messages: list[dict], answer: str, question: str) -> list[dict]:
    return messages + [{"role": "assistant", "content": answer}, {"role": "user", "content": question}]


@pytest.fixture
def engine(llama_model, tmp_path):
    engine = make_engine(llama_model, tmp_path)
    yield engine
    engine.close()


def test_follow_up_turn_takes_the_live_cache_without_a_copy_and_stays_exact(engine, reference):
    first = agent_messages("live", question="List the files.")
    answer, usage = run(engine, reference.chat_tokens(first))
    assert usage.live_tokens == 0 and engine.store.stats()["live"]["entries"] == 1

    second = follow_up(reference, first, answer, "Now open the main module.")
    tokens = reference.chat_tokens(second)
    text, usage = run(engine, tokens)
    assert text == reference.generate(tokens, MAX_TOKENS)
    assert usage.live_tokens == usage.ram_tokens == usage.cached_tokens > len(reference.chat_tokens(first)) // 2
    assert "buffers" not in usage.steps and "rebuild" not in usage.steps  # taken over, not copied
    assert {"prefill", "first_token"} <= set(usage.steps)  # TTFT's steps, all timed
    counters = engine.store.counters
    assert counters["requests_live"] == 1 and counters["tokens_from_live"] == usage.live_tokens
    assert counters["tokens_from_ram"] == usage.ram_tokens  # the first request was cold


def test_edited_last_message_trims_the_live_cache_and_stays_exact(engine, reference):
    # The system prompt is several 256-token steps long: the trim goes back inside a grown buffer.
    first = agent_messages("trim", question="Summarise the README in three points.")
    run(engine, reference.chat_tokens(first))
    edited = agent_messages("trim", question="Summarise the changelog instead.")
    tokens = reference.chat_tokens(edited)
    text, usage = run(engine, tokens)
    assert text == reference.generate(tokens, MAX_TOKENS)
    assert 256 < usage.live_tokens < len(reference.chat_tokens(first)) - 1
    # The trimmed cache went on to hold the edited turn: asking it again is exact too.
    again, usage = run(engine, tokens)
    assert again == text and usage.live_tokens == len(tokens) - 1


def test_unrelated_prompt_takes_the_normal_path_and_the_tiers_win_when_they_hold_more(engine, reference):
    first = reference.chat_tokens(agent_messages("alpha"))
    run(engine, first)
    other = [t + 1 for t in first[::-1]]  # shares no prefix with it
    text, usage = run(engine, other)
    assert text == reference.generate(other, MAX_TOKENS)
    assert usage.cached_tokens == 0 and engine.store.stats()["live"]["entries"] == 2  # alpha's is still there
    # A prompt sharing only alpha's first tokens leaves alpha's live cache to alpha ...
    header = first[:5] + other[5:]
    assert run(engine, header)[1].live_tokens == 0
    # ... one sharing most of it takes it, trimmed ...
    most = first[: len(first) * 3 // 4] + other[:20]
    assert run(engine, most)[1].live_tokens == len(first) * 3 // 4
    # ... so for alpha again the live caches hold less of it than the hot blocks: those serve it.
    text, usage = run(engine, first)
    assert text == reference.generate(first, MAX_TOKENS)
    assert usage.live_tokens == 0 and usage.ram_tokens == len(first) - 1


def test_memory_pressure_and_purge_drop_the_live_caches(engine, reference):
    tokens = reference.chat_tokens(agent_messages("pressure"))
    run(engine, tokens)
    assert engine.store.stats()["live"]["bytes"] > 0
    engine.store.spill(0)  # what the pressure watcher does on the MLX thread
    assert engine.store.stats()["live"] == {"entries": 0, "bytes": 0}
    text, usage = run(engine, tokens)
    assert text == reference.generate(tokens, MAX_TOKENS) and usage.live_tokens == 0

    # A purge drops the live caches, and refuses the one a request holds while it runs.
    running = generate(engine, GenerationRequest(tokens, MAX_TOKENS, temperature=0.0))
    assert next(running).cached_tokens == len(tokens) - 1  # it has taken the live cache over
    engine.store.forget_hot()
    list(running)
    assert engine.store.stats()["live"]["entries"] == 0
    assert engine.store.counters["live_refused"] == 1


def test_a_live_cache_that_does_not_fit_the_ram_budget_is_not_kept(llama_model, tmp_path, reference):
    engine = make_engine(llama_model, tmp_path, ram_budget=1 << 20)  # a few blocks
    try:
        tokens = reference.chat_tokens(agent_messages("budget"))
        run(engine, tokens)
        assert engine.store.stats()["live"]["entries"] == 0 and engine.store.counters["live_refused"] == 1
        assert engine.store.hot_bytes() <= (1 << 20) + engine.store.stats()["ram"]["pending_bytes"]
    finally:
        engine.close()


def test_a_failed_request_leaves_no_live_cache(llama_model, tmp_path, reference):
    from daemon.faults import InjectedFault, fail_on_token

    engine = make_engine(llama_model, tmp_path)
    try:
        tokens = reference.chat_tokens(agent_messages("fault"))
        run(engine, tokens)
        poisoned = tokens[:-1] + [7, tokens[-1]]
        fail_on_token(engine.model, 7)  # its prefill raises, mid-way through the layers
        with pytest.raises(InjectedFault):
            run(engine, poisoned)
        assert engine.store.stats()["live"]["entries"] == 0  # taken by the failed request, not given back
    finally:
        engine.close()


@pytest.mark.parametrize("arch", ["qwen3_next", "mamba2", "sliding", "nemotron_h"])
def test_snapshot_layers_take_a_live_cache_only_when_the_prompt_extends_it_whole(arch, tmp_path):
    model = make_model(MODELS / arch, arch)
    reference = Reference(model)
    engine = make_engine(model, tmp_path)
    try:
        first = reference.chat_tokens(agent_messages(arch, repeat=2))
        run(engine, first)
        assert engine.store.live is not None
        (held,) = engine.store.live.sequences()
        assert held[: len(first)] == first
        extended = held + first[-4:]  # the whole sequence it holds (prompt and answer), then more
        text, usage = run(engine, extended)
        assert text == reference.generate(extended, MAX_TOKENS)
        assert usage.live_tokens == len(held)

        edited = first[:-8] + first[-4:]  # parts from it inside the sequence: recurrent state cannot go back
        text, usage = run(engine, edited)
        assert text == reference.generate(edited, MAX_TOKENS)
        assert usage.live_tokens == 0
    finally:
        engine.close()


def test_through_the_daemon_usage_and_stats_show_it_and_delete_cache_drops_it(llama_model, tmp_path, reference):
    from tests.inprocess import InProcessDaemon

    daemon = InProcessDaemon(llama_model, tmp_path / "cache").start()
    try:
        def ask(messages):
            response = daemon.client().chat.completions.create(
                model=str(daemon.model), messages=messages, max_tokens=MAX_TOKENS, temperature=0)
            return response.choices[0].message.content, response.usage.model_extra["kvtier"]

        first = agent_messages("daemon")
        answer, _ = ask(first)
        second = follow_up(reference, first, answer, "And then?")
        text, usage = ask(second)
        assert text == reference.chat(second, MAX_TOKENS) and usage["live_tokens"] == usage["ram_tokens"] > 0
        stats = daemon.get("/cache/stats")
        assert stats["live"]["entries"] == 1 and stats["tokens"]["from_live"] == usage["live_tokens"]

        assert daemon.request("DELETE", "/cache?all=true").status == 200
        assert daemon.get("/cache/stats")["live"] == {"entries": 0, "bytes": 0}
        text, usage = ask(second)
        assert text == reference.chat(second, MAX_TOKENS) and usage["live_tokens"] == usage["ram_tokens"] == 0
        assert daemon.get("/cache/stats")["live"]["entries"] == 1  # begun after the purge: kept again
    finally:
        daemon.stop()


def test_a_batched_follow_up_takes_the_cache_the_batch_gave_back(engine, reference):
    from kvtier.scheduler import Scheduler

    done = object()
    batch = Scheduler(engine, max_size=4, done=done)
    try:
        def ask(conversations: list[list[dict]]) -> list[list]:
            outputs: list[list] = [[] for _ in conversations]
            for messages, out in zip(conversations, outputs):
                batch.add(GenerationRequest(reference.chat_tokens(messages), MAX_TOKENS, temperature=0.0), out.append)
            while not batch.idle:
                batch.step()
            return outputs

        first, other = agent_messages("batched"), agent_messages("other", question="Run it.")
        answers = ask([first, other])  # decoded together: their caches extracted from the batch
        follow = follow_up(reference, first, "".join(c.text for c in answers[0][:-1]), "Continue.")
        (items,) = ask([follow])
        assert items[-1] is done and "".join(c.text for c in items[:-1]) == reference.chat(follow, MAX_TOKENS)
        assert items[-2].usage.live_tokens == items[-2].usage.cached_tokens > len(reference.chat_tokens(first)) // 2
    finally:
        batch.close()


class PassWidths:
    """mlx-lm's model, recording how many tokens each forward pass took."""

    def __init__(self, model):
        self.model, self.widths = model, []

    def __call__(self, inputs, *args, **kwargs):
        self.widths.append(inputs.shape[1])
        return self.model(inputs, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


@pytest.mark.parametrize("max_tokens", [1, 5])
def test_an_answer_runs_no_forward_pass_past_its_last_token_and_its_follow_up_stays_exact(engine, reference, max_tokens):
    """The first token is read before its own step is queued (on the CPU, queuing it first
    made TTFT wait for most of that step), and the last token's step, whose output nobody
    reads, is never queued: what is kept of the answer is what its cache holds."""
    first = agent_messages("last token")
    tokens = reference.chat_tokens(first)
    run(engine, tokens[:-8])  # the system prompt cached, so the request below computes a few tokens
    engine.model = counted = PassWidths(engine.model)
    chunks = list(generate(engine, GenerationRequest(list(tokens), max_tokens, temperature=0.0)))
    text, usage = "".join(c.text for c in chunks), chunks[-1].usage
    assert text == reference.generate(tokens, max_tokens) and chunks[-1].finish_reason == "length"
    assert usage is not None
    new = len(tokens) - usage.cached_tokens
    # The remainder but its last token, the last token, then a step for each token but the last.
    assert counted.widths == [new - 1, 1] + [1] * (max_tokens - 1)
    follow = follow_up(reference, first, text, "And then?")
    again, usage = run(engine, reference.chat_tokens(follow))
    assert again == reference.chat(follow, MAX_TOKENS) and usage.live_tokens >= len(tokens) - 1
