"""Work the MLX thread does only while the daemon is idle (daemon/worker.py, daemon/loading.py):
the prefetch of a model loaded on demand waits for it, so the request the model was loaded for
restores its own blocks first. (The batched-decode probe's pieces wait likewise:
tests/test_measured.py.)"""

from __future__ import annotations

import json
import shutil

from tests.conftest import Reference, agent_messages


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
