"""Several models in one daemon (daemon/models.py, daemon/worker.py): a request's `model`
chooses one; under a memory budget that fits one, switching unloads the other, whose KV is
kept on disk, so that coming back restores it instead of computing it again; answers are
plain mlx-lm's for each model, alone or beside the other model's requests."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from daemon.state import STATE
from kvtier.config import CacheConfig, ModelSpec, ServeConfig
from kvtier.engine import Engine
from kvtier.models_memory import weights_on_disk
from kvtier.requests import GenerationRequest
from kvtier.scheduler import generate
from tests.conftest import MODELS, TEST_BLOCK_SIZE, Reference, agent_messages
from tests.inprocess import InProcessDaemon
from tests.support.testmodels import make_model

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def hybrid_model() -> Path:
    return make_model(MODELS / "qwen3_next", "qwen3_next")


def fits_one(llama: Path, hybrid: Path):
    """A memory budget that holds either model's weights, never both."""
    budget = weights_on_disk(llama) + weights_on_disk(hybrid) - 1

    def configure(config: ServeConfig) -> None:
        config.models = [ModelSpec(str(llama), name="llama", aliases=["claude-*"]),
                         ModelSpec(str(hybrid), name="hybrid", aliases=["claude-*haiku*"])]
        config.memory_budget = max(budget, weights_on_disk(llama), weights_on_disk(hybrid))
    return configure


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, llama_model, hybrid_model):
    daemon = InProcessDaemon(llama_model, tmp_path_factory.mktemp("models") / "cache",
                             configure=fits_one(llama_model, hybrid_model)).start()
    yield daemon
    daemon.stop()


def ask(daemon: InProcessDaemon, model: str, messages: list[dict]) -> tuple[str | None, int]:
    """The greedy answer and the prompt tokens it had from the cache."""
    response = daemon.client().chat.completions.create(model=model, messages=messages,
                                                       max_tokens=MAX_TOKENS, temperature=0)
    assert response.model == model
    details = response.usage.prompt_tokens_details if response.usage else None
    return response.choices[0].message.content, (details.cached_tokens or 0) if details else 0


class Stream:
    """A streamed greedy chat answer, read by `read` on a thread of the test's: its text so
    far, whether it has started, whether it has ended."""

    def __init__(self, daemon: InProcessDaemon, model: str, messages: list[dict], max_tokens: int):
        self.client, self.model, self.messages, self.max_tokens = daemon.client(), model, messages, max_tokens
        self.pieces: list[str] = []
        self.started, self.ended = threading.Event(), threading.Event()

    def read(self) -> None:
        stream = self.client.chat.completions.create(model=self.model, messages=self.messages,
                                                     max_tokens=self.max_tokens, temperature=0, stream=True)
        for event in stream:
            self.started.set()
            self.pieces.extend(c.delta.content or "" for c in event.choices)
        self.ended.set()

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def state_of(daemon: InProcessDaemon, name: str) -> str:
    return daemon.app[STATE].worker.models[name].state


def test_each_model_answers_as_plain_mlx_lm_and_a_switch_unloads_the_other(two_models, llama_model,
                                                                            hybrid_model):
    messages = agent_messages("switching", repeat=2)
    llama_answer, _ = ask(two_models, "llama", messages)
    assert state_of(two_models, "llama") == "loaded"
    hybrid_answer, _ = ask(two_models, "hybrid", messages)
    assert state_of(two_models, "hybrid") == "loaded" and state_of(two_models, "llama") == "unloaded"
    models = two_models.app[STATE].worker.models
    engines = [models[name].engine for name in ("llama", "hybrid")]
    assert engines[0] is not None and engines[1] is not None
    assert engines[0].store.disk is engines[1].store.disk  # the index stayed open through the switch
    assert llama_answer == Reference(llama_model).chat(messages, MAX_TOKENS)
    assert hybrid_answer == Reference(hybrid_model).chat(messages, MAX_TOKENS)


def test_coming_back_to_a_model_restores_its_conversation_instead_of_computing_it(two_models, llama_model):
    messages = agent_messages("come back", repeat=3)
    first, _ = ask(two_models, "llama", messages)
    ask(two_models, "hybrid", agent_messages("meanwhile", repeat=1))  # llama is unloaded for it
    assert state_of(two_models, "llama") == "unloaded"
    served = two_models.app[STATE].worker.models["llama"]
    loads, chunk = served.loads, served.prefill_chunk
    again, cached = ask(two_models, "llama", messages)
    assert served.loads == loads + 1
    assert served.engine is not None and served.engine.prefill_chunk is chunk  # the first load's, not timed again
    assert again == first == Reference(llama_model).chat(messages, MAX_TOKENS)
    prompt = len(Reference(llama_model).chat_tokens(messages))
    assert cached >= prompt - 64  # all but the partial last block came from the disk


def test_what_an_unloaded_model_still_had_to_write_is_on_disk_after_the_daemon_stops(tmp_path, llama_model,
                                                                                      hybrid_model):
    """A hybrid request right after llama's answer unloads llama while its last blocks may
    still be queued for disk: they are written in the background, and the daemon's stop waits
    for them. A new engine on the cache directory restores llama's whole prompt from disk."""
    def configure(config: ServeConfig) -> None:
        fits_one(llama_model, hybrid_model)(config)
        config.max_batch = 1  # no batched-decode probe: this test is about the disk

    daemon = InProcessDaemon(llama_model, tmp_path / "cache", configure=configure).start()
    messages = agent_messages("written after the unload", repeat=3)
    try:
        ask(daemon, "llama", messages)
        ask(daemon, "hybrid", agent_messages("right after", repeat=1))
        assert state_of(daemon, "llama") == "unloaded"
    finally:
        daemon.stop()
    reference = Reference(llama_model)
    tokens = reference.chat_tokens(messages)
    engine = Engine(str(llama_model), CacheConfig(cache_dir=tmp_path / "cache", block_size=TEST_BLOCK_SIZE))
    try:
        chunks = list(generate(engine, GenerationRequest(tokens, MAX_TOKENS, temperature=0.0)))
    finally:
        engine.close()
    usage = chunks[-1].usage
    assert usage is not None and usage.disk_tokens == len(tokens) - 1  # all but the last token, computed
    assert "".join(c.text for c in chunks) == reference.generate(tokens, MAX_TOKENS)


def test_requests_for_both_models_at_once_all_finish_with_plain_mlx_lm_answers(two_models, llama_model,
                                                                               hybrid_model):
    asks = [("llama", agent_messages("alpha", repeat=1)), ("hybrid", agent_messages("beta", repeat=1)),
            ("llama", agent_messages("gamma", repeat=1)), ("hybrid", agent_messages("delta", repeat=1))]
    with ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(lambda a: ask(two_models, *a)[0], asks))
    references = {"llama": Reference(llama_model), "hybrid": Reference(hybrid_model)}
    assert answers == [references[model].chat(messages, MAX_TOKENS) for model, messages in asks]


def test_glob_aliases_send_claude_codes_small_model_names_to_the_small_model(two_models, llama_model,
                                                                           hybrid_model):
    messages = agent_messages("globs", repeat=1)
    haiku, _ = ask(two_models, "claude-haiku-4-5-20251001", messages)
    sonnet, _ = ask(two_models, "claude-sonnet-4-5-20250929", messages)
    assert haiku == Reference(hybrid_model).chat(messages, MAX_TOKENS)
    assert sonnet == Reference(llama_model).chat(messages, MAX_TOKENS)
    assert haiku != sonnet


def test_a_model_larger_than_the_memory_budget_is_refused_naming_the_sizes(tmp_path, tiny_model, llama_model):
    def configure(config: ServeConfig) -> None:
        config.models = [ModelSpec(str(tiny_model), name="tiny"), ModelSpec(str(llama_model), name="large")]
        config.memory_budget = weights_on_disk(llama_model) // 2

    daemon = InProcessDaemon(tiny_model, tmp_path / "cache", configure=configure).start()
    try:
        reply = daemon.post("/v1/chat/completions", {"model": "large", "max_tokens": 2,
                                                     "messages": [{"role": "user", "content": "hi"}]})
        assert reply.status == 400, reply.text
        error = reply.json()["error"]
        assert error["code"] == "model_too_large" and error["param"] == "model"
        assert "memory budget" in error["message"] and "MiB" in error["message"]
        assert state_of(daemon, "tiny") == "loaded"  # the default model kept serving
        ok = daemon.post("/v1/chat/completions", {"model": "tiny", "max_tokens": 2,
                                                  "messages": [{"role": "user", "content": "hi"}]})
        assert ok.status == 200, ok.text
    finally:
        daemon.stop()


def test_an_idle_model_is_unloaded_after_the_keep_alive(tmp_path, tiny_model, caplog):
    def configure(config: ServeConfig) -> None:
        config.models = [ModelSpec(str(tiny_model), name="tiny")]
        config.keep_alive = 0.5

    daemon = InProcessDaemon(tiny_model, tmp_path / "cache", configure=configure).start()
    try:
        messages = agent_messages("keep alive", repeat=1)
        first, _ = ask(daemon, "tiny", messages)
        deadline = time.monotonic() + 60
        while state_of(daemon, "tiny") != "unloaded" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert state_of(daemon, "tiny") == "unloaded"
        caplog.set_level("INFO", logger="kvtier.worker")
        again, cached = ask(daemon, "tiny", messages)  # loaded again on demand, its prompt from disk
        assert again == first and cached > 0
        logged = [r.getMessage() for r in caplog.records if r.name == "kvtier.worker"]
        assert {"tiny: reading weights", "tiny: opening the cache"} <= set(logged)  # the load's progress
    finally:
        daemon.stop()


def test_a_model_serving_a_request_is_not_unloaded_for_another(two_models, llama_model, hybrid_model):
    """A long llama answer streams while a hybrid request waits for room: the llama stream
    ends complete and exact, then the hybrid request is served."""
    long_messages = agent_messages("long answer", repeat=1)
    ask(two_models, "llama", agent_messages("load llama first", repeat=1))
    stream = Stream(two_models, "llama", long_messages, 48)
    with ThreadPoolExecutor(2) as pool:
        llama = pool.submit(stream.read)
        assert stream.started.wait(120)
        hybrid = pool.submit(ask, two_models, "hybrid", agent_messages("waits", repeat=1))
        llama.result(300)
        hybrid_answer, _ = hybrid.result(300)
    assert stream.text == Reference(llama_model).chat(long_messages, 48)
    assert hybrid_answer == Reference(hybrid_model).chat(agent_messages("waits", repeat=1), MAX_TOKENS)


def test_two_loaded_models_both_make_progress_at_once(tmp_path, llama_model, hybrid_model):
    """With room for both, a hybrid request is answered while a long llama stream is still
    running: the worker steps each model's batch in turn."""
    def configure(config: ServeConfig) -> None:
        config.models = [ModelSpec(str(llama_model), name="llama"), ModelSpec(str(hybrid_model), name="hybrid")]

    daemon = InProcessDaemon(llama_model, tmp_path / "cache", configure=configure, ceiling=None).start()
    try:
        ask(daemon, "hybrid", agent_messages("load hybrid", repeat=1))
        long_messages = agent_messages("long stream", repeat=1)
        stream = Stream(daemon, "llama", long_messages, 400)
        with ThreadPoolExecutor(1) as pool:
            llama = pool.submit(stream.read)
            assert stream.started.wait(120)
            hybrid_answer, _ = ask(daemon, "hybrid", agent_messages("beside", repeat=1))
            finished_first = not stream.ended.is_set()
            llama.result(300)
        assert finished_first, "the hybrid request waited for the whole llama stream"
        assert state_of(daemon, "llama") == state_of(daemon, "hybrid") == "loaded"
        assert hybrid_answer == Reference(hybrid_model).chat(agent_messages("beside", repeat=1), MAX_TOKENS)
        assert stream.text == Reference(llama_model).chat(long_messages, 400)
        assert_seeded_sampling_runs_alone_across_models(daemon)
    finally:
        daemon.stop()


def assert_seeded_sampling_runs_alone_across_models(daemon: InProcessDaemon) -> None:
    """A seeded request's random stream is the process's: a sampling request of the other
    model must not draw from it meanwhile, or the seed would not repeat its answer."""
    client = daemon.client()
    seeded_messages = agent_messages("seeded", question="Say something.", repeat=1)

    def seeded() -> str | None:
        return client.chat.completions.create(model="hybrid", messages=seeded_messages, max_tokens=16,
                                              temperature=1.0, seed=11).choices[0].message.content

    def sampling() -> str | None:
        return client.chat.completions.create(model="llama", messages=agent_messages("noise", repeat=1),
                                              max_tokens=64, temperature=1.0).choices[0].message.content

    alone = seeded()
    with ThreadPoolExecutor(3) as pool:
        beside = [pool.submit(sampling), pool.submit(seeded), pool.submit(sampling)]
        assert beside[1].result(300) == alone
        beside[0].result(300), beside[2].result(300)


def test_purge_takes_the_name_a_daemon_served_the_model_by(tmp_path, tiny_model):
    from tests.test_purge_models import entries_by_name, kvtier

    def configure(config: ServeConfig) -> None:
        config.models = [ModelSpec(str(tiny_model), name="small", aliases=["claude-*haiku*"])]

    daemon = InProcessDaemon(tiny_model, tmp_path / "cache", configure=configure).start()
    try:
        ask(daemon, "claude-haiku-4-5", agent_messages("purge me", repeat=1))
    finally:
        daemon.stop()
    assert entries_by_name(tmp_path / "cache")["small"] > 0  # recorded under its configured name
    purged = kvtier("purge", "--model", "small", "--cache-dir", str(tmp_path / "cache"))
    assert purged.returncode == 0, purged.stderr
    assert not entries_by_name(tmp_path / "cache")


def test_after_a_restart_a_second_model_restores_its_conversation_from_disk(daemon_factory, tiny_model,
                                                                           hybrid_model):
    """`kvtier serve --model PATH --model hybrid=PATH`, stopped and started again: the second
    model loads on its first request and restores what it computed before the restart."""
    daemon = daemon_factory(tiny_model, "--model", f"hybrid={hybrid_model}")
    messages = agent_messages("restart", repeat=2)
    before, _ = ask(daemon, "hybrid", messages)
    assert daemon.stop() == 0
    daemon.start()
    after, cached = ask(daemon, "hybrid", messages)
    assert after == before == Reference(hybrid_model).chat(messages, MAX_TOKENS)
    assert cached >= len(Reference(hybrid_model).chat_tokens(messages)) - 64


def test_cache_warm_warms_the_model_its_body_names(two_models):
    """`model` in /cache/warm's body selects the model as a chat request's does (here by a
    glob alias), loading it: a chat for that model then finds the warmed prompt cached."""
    messages = agent_messages("warmed for the small model", repeat=3)
    assert two_models.post("/models/hybrid/unload", {}).status == 200  # whatever earlier tests left loaded
    assert state_of(two_models, "hybrid") == "unloaded"
    warmed = two_models.post("/cache/warm", {"model": "claude-haiku-4-5", "messages": messages})
    assert warmed.status == 200, warmed.body
    assert state_of(two_models, "hybrid") == "loaded"
    assert warmed.json()["computed_tokens"] > 0
    _, cached = ask(two_models, "hybrid", messages)
    assert cached > 0


def test_cache_warm_under_strict_names_refuses_a_model_not_served(app_factory, llama_model):
    daemon = app_factory(llama_model, "--strict-model-names")
    refused = daemon.post("/cache/warm", {"model": "gpt-9", "prompt": "a system prompt"})
    assert refused.status == 404
    assert refused.json()["error"]["code"] == "model_not_found"
    assert refused.json()["error"]["param"] == "model"
    assert daemon.post("/cache/warm", {"model": "default", "prompt": "a system prompt"}).status == 200
    assert daemon.post("/cache/warm", {"prompt": "a system prompt"}).status == 200
