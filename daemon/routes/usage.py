"""A generation's usage in each API's shape: the token counts the API defines, and the same
`kvtier` block of where the prompt's tokens came from (RAM, disk, the shared store, live,
prefetched or computed) and how long the first token took."""

from __future__ import annotations

from kvtier.requests import Usage


def _tiers(usage: Usage) -> dict:
    return {"ram_tokens": usage.ram_tokens, "disk_tokens": usage.disk_tokens,
            "shared_tokens": usage.shared_tokens, "live_tokens": usage.live_tokens,
            "prefetched_tokens": usage.prefetched_tokens, "computed_tokens": usage.computed_tokens,
            "time_to_first_token": round(usage.prefill_seconds, 4)}


def openai_usage(usage: Usage | None) -> dict:
    assert usage is not None, "only a generation's last chunk carries usage, and only it is asked"
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "kvtier": dict(_tiers(usage), restore_seconds=round(usage.restore_seconds, 4),
                       restored_bytes=usage.restored_bytes),
    }


def anthropic_usage(usage: Usage | None) -> dict:
    """Anthropic counts as input only the tokens it computed; the cache's are read from it
    (none are "created": see daemon/routes/anthropic.py)."""
    assert usage is not None, "only a generation's last chunk carries usage, and only it is asked"
    return {
        "input_tokens": usage.computed_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": usage.cached_tokens,
        "output_tokens": usage.completion_tokens,
        "kvtier": {"prompt_tokens": usage.prompt_tokens, **_tiers(usage)},
    }


def anthropic_start_usage(prompt_tokens: int, cached_tokens: int) -> dict:
    """message_start's usage: the prompt's split as anthropic_usage gives it, no output yet."""
    return {"input_tokens": prompt_tokens - cached_tokens, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached_tokens, "output_tokens": 0}


def responses_usage(usage: Usage) -> dict:
    return {"input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_tokens,
                                     "cache_write_tokens": usage.computed_tokens},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "kvtier": _tiers(usage)}
