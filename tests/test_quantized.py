"""`--kv-bits`: a quantized KV cache is cut into blocks like any other, and reuse is exact
against plain mlx-lm running with the same quantized cache from the first token."""

from __future__ import annotations

import mlx_lm

from conftest import agent_messages
from kvtier import kvstate

MAX_TOKENS = 16


def plain_quantized(reference, messages) -> str:
    prompt_cache = kvstate.make_cache(reference.model, kvstate.Quantization(bits=8))
    return mlx_lm.generate(reference.model, reference.tokenizer, prompt=reference.chat_tokens(messages),
                           max_tokens=MAX_TOKENS, prompt_cache=prompt_cache)


def test_quantized_kv_reuse_is_exact_across_restart(daemon_factory, llama_model, reference):
    daemon = daemon_factory(llama_model, "--kv-bits", "8")
    client = daemon.client()
    messages = agent_messages("delta", question="Where is the config parsed?")
    for step in ("cold", "warm", "restart"):
        if step == "restart":
            daemon.restart()
        response = client.chat.completions.create(model=str(llama_model), messages=messages,
                                                  max_tokens=MAX_TOKENS, temperature=0)
        assert response.choices[0].message.content == plain_quantized(reference, messages), step
        cached = response.usage.prompt_tokens_details.cached_tokens
        assert (cached == 0) == (step == "cold")
        messages = messages[:-1] + [{"role": "user", "content": f"And in {step} mode?"}]
    assert daemon.get("/cache/stats")["fingerprint"] != _fingerprint_without_bits(daemon_factory, llama_model)


def _fingerprint_without_bits(daemon_factory, model) -> str:
    """Quantized blocks are keyed apart from full-precision ones of the same model."""
    from pathlib import Path
    import tempfile

    plain = daemon_factory(model, cache_dir=Path(tempfile.mkdtemp()) / "cache")
    return plain.get("/cache/stats")["fingerprint"]
