"""Prompt lines that change on every conversation but say nothing to the model.

Claude Code (>= 2.1.36) sends `x-anthropic-billing-header: cc_version=…; cc_entrypoint=…;
cch=…;` as its first system block. Its value changes per conversation, and because it comes
first, keeping it would make every new conversation a cache miss. vLLM, llama.cpp and Ollama
drop it too. `--keep-billing-header` turns this off.
"""

from __future__ import annotations

BILLING_PREFIX = "x-anthropic-billing-header:"


def drop_billing_line(texts: list[str]) -> list[str]:
    """System texts without the billing line (a block of its own, or a block's first line)."""
    out = []
    for text in texts:
        if text.lstrip().startswith(BILLING_PREFIX):
            _, _, text = text.lstrip().partition("\n")
            if not text:
                continue
        out.append(text)
    return out
