"""Work the MLX thread does only while the daemon is idle (daemon/worker.py): the pieces of the
batched-decode probe of a model loaded on demand. A route loads its model first, then renders
the prompt and submits the request: the probe must not start in between (the request would
wait for a piece, 0.1-0.5 s)."""

from __future__ import annotations

import json
import shutil
import time

from tests.conftest import Reference, agent_messages


def test_the_request_a_model_was_loaded_for_comes_before_the_idle_probe(app_factory, tiny_model, llama_model,
                                                                        caplog):
    caplog.set_level("DEBUG", logger="kvtier.worker")
    daemon = app_factory(tiny_model, "--max-batch", "4", "--model", f"second={llama_model}")
    messages = agent_messages("loaded for this request", repeat=1)
    answer = daemon.client().chat.completions.create(model="second", messages=messages, max_tokens=8,
                                                     temperature=0).choices[0].message.content
    deadline = time.monotonic() + 120
    while daemon.get("/health")["models"]["second"]["batching"]["max_logprob_difference"] is None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    logged = [r.getMessage() for r in caplog.records if r.name == "kvtier.worker"]
    loaded = next(i for i, line in enumerate(logged) if line.startswith("model second loaded"))
    admitted = next(i for i, line in enumerate(logged) if line.startswith("second: a request of"))
    first_piece = logged.index("second: a piece of the batched-decode probe")
    assert loaded < admitted < first_piece
    assert answer == Reference(llama_model).chat(messages, 8)


def test_the_request_a_model_was_reloaded_for_restores_from_disk_before_any_prefetch(tmp_path, llama_model):
    """Switching back to a model reloads it; its prefetch then waits for the idle time, so the
    waiting request reads its blocks straight into its own buffers instead of after a slice."""
    from kvtier.config import ModelSpec, ServeConfig
    from kvtier.models_memory import weights_on_disk
    from tests.inprocess import InProcessDaemon

    other = tmp_path / "other"
    shutil.copytree(llama_model, other)  # a second model of its own files: another fingerprint
    config_json = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(config_json, note="a copy")))

    def configure(config: ServeConfig) -> None:
        config.models = [ModelSpec(str(llama_model), name="first"), ModelSpec(str(other), name="second")]
        config.memory_budget = weights_on_disk(llama_model) + weights_on_disk(other) - 1  # one at a time

    daemon = InProcessDaemon(llama_model, tmp_path / "cache", configure=configure).start()
    try:
        client = daemon.client()
        messages = agent_messages("switch back", repeat=3)

        def ask(model: str) -> tuple[str | None, dict]:
            reply = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
            return reply.choices[0].message.content, reply.usage.model_extra["kvtier"]

        first, _ = ask("first")
        ask("second")  # the first model is unloaded for it
        again, usage = ask("first")
        assert usage["disk_tokens"] > 0 and usage["prefetched_tokens"] == 0
        assert again == first == Reference(llama_model).chat(messages, 8)
    finally:
        daemon.stop()
