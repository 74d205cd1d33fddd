"""The order `make test` hands test files to its pytest processes: the longest first.

`make test` runs `pytest -n 3 --dist loadfile --no-loadscope-reorder`: each file goes whole
to one process, in collection order. xdist's own order (most tests first) left files of few
but slow tests (restarts, budgets, kills) to the end, where one process ran them while the
others had finished. Longest first, the short files fill in at the end instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest

# Test files by their total time in one `make test` run (durations under load, slowest first);
# the others follow in their usual order. Rough is fine: only the order matters.
LONGEST = (
    "test_hybrid.py", "test_live.py", "test_reliability.py", "test_models.py", "test_daemon_reuse.py",
    "test_batching.py", "test_security_load.py", "test_prefetch.py", "test_api_anthropic.py",
    "test_batch_answers.py", "test_cli.py", "test_api_responses.py", "test_status_page.py",
    "test_index.py", "test_shared.py", "test_cache_admin.py", "test_startup.py", "test_quantized.py",
    "test_service.py", "test_agent_clients.py", "test_operations.py", "test_lone_request.py",
)


def longest_first(items: list[pytest.Item]) -> list[pytest.Item]:
    """`items` with the files of LONGEST first (in its order); tests within a file keep theirs."""
    rank = {name: i for i, name in enumerate(LONGEST)}
    return sorted(items, key=lambda item: rank.get(Path(str(item.path)).name, len(LONGEST)))
