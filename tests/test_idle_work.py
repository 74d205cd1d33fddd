"""Work the MLX thread does only while the daemon is idle (daemon/worker.py): the pieces of the
batched-decode probe of a model loaded on demand. A route loads its model first, then renders
the prompt and submits the request: the probe must not start in between (the request would
wait for a piece, 0.1-0.5 s)."""

from __future__ import annotations

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
