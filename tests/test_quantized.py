"""`--kv-bits`: a quantized KV cache is cut into blocks like any other, and restored bit for bit.

Quantizing keys amplifies the last-bit differences of different prefill chunkings into
whole quantization steps, so with `--kv-bits` plain mlx-lm itself answers differently for
different `prefill_step_size` values (seen with this model: 8-bit KV, prompt B below,
steps 2048 vs 128 give different text; float KV does not). The reference for a reused prefix is
therefore plain mlx-lm computing the same chunks kvtier computed: the request that cached
the prefix, then the new remainder.
"""

from __future__ import annotations

import mlx.core as mx
import mlx_lm

from kvtier import kvstate
from tests.conftest import agent_messages

MAX_TOKENS = 16
Q8 = kvstate.Quantization(bits=8)


def plain(reference, chunks: list[list[int]], trims: list[int | None], last: list[int]) -> str:
    """mlx-lm with a quantized cache: prefill each chunk (trimming the cache to the given
    length after it, as a partial reuse does), then generate from `last`."""
    prompt_cache = kvstate.make_cache(reference.model, Q8)
    for chunk, keep in zip(chunks, trims):
        reference.model(mx.array(chunk)[None], cache=prompt_cache)
        if keep is not None:
            for layer in prompt_cache:
                layer.trim(layer.offset - keep)
    return mlx_lm.generate(reference.model, reference.tokenizer, prompt=last, max_tokens=MAX_TOKENS,
                           prompt_cache=prompt_cache)


def test_quantized_kv_reuse_is_exact_across_restart(app_factory, llama_model, reference):
    """Through the daemon's app in the test process: a restart is a new app on the same cache."""
    flags = ("--kv-bits", "8", "--prefetch", "0")  # after the restart, blocks come from disk
    daemon = app_factory(llama_model, *flags)

    def ask(messages):
        r = daemon.client().chat.completions.create(model=str(llama_model), messages=messages,
                                           max_tokens=MAX_TOKENS, temperature=0)
        return r.choices[0].message.content, r.usage.prompt_tokens_details.cached_tokens

    a = agent_messages("delta", question="Where is the config parsed?")
    b = agent_messages("delta", question="And in warm mode?")
    ta, tb = reference.chat_tokens(a), reference.chat_tokens(b)

    text, cached = ask(a)  # cold: one prefill chunk, as mlx-lm does it
    assert cached == 0 and text == plain(reference, [ta[:-1]], [None], ta[-1:])
    text, shared = ask(b)  # warm: A's cached prefix, then B's remainder
    assert 0 < shared < len(tb)
    assert text == plain(reference, [ta[:-1]], [shared], tb[shared:])
    daemon.stop()  # flushes every hot block, as SIGTERM does
    daemon = app_factory(llama_model, *flags, cache_dir=daemon.cache_dir)
    text, cached = ask(b)  # from disk: the same chunks again, last token recomputed
    assert cached == len(tb) - 1
    assert text == plain(reference, [ta[:-1], tb[shared:-1]], [shared, None], tb[-1:])


def test_quantized_fingerprint_differs(app_factory, llama_model):
    """Quantized blocks are keyed apart from full-precision ones of the same model."""
    quantized = app_factory(llama_model, "--kv-bits", "8")
    full = app_factory(llama_model)
    assert quantized.get("/cache/stats")["fingerprint"] != full.get("/cache/stats")["fingerprint"]
