"""Restore bandwidth from SSD, repeated: a 16K-token prefix is cached once, then each trial
restarts kvtier on a copy of that cache, evicts its files from the page cache, and times the restore against
a raw sequential read of the same files (the physical limit).

    python bench/restore.py [--trials 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from harness import DISK_PATH, ROOT, Server, stream_chat, warm_up
from prompts import QUESTIONS, agent_system_prompt, messages_for
from scenarios.restore_bandwidth import evict_files, raw_read

from tests.support.testmodels import make_model


def cached_prefix(model: Path, system: str, cache: Path) -> None:
    server = Server.kvtier(model, cache, cache.parent / "cold.log")
    server.start()
    try:
        stream_chat(server, str(model), messages_for(system, QUESTIONS[0]))
    finally:
        server.stop()  # SIGTERM writes every block


def trial(model: Path, system: str, cache: Path) -> tuple[float, float, float]:
    work = Path(tempfile.mkdtemp(prefix="kvtier-restore-"))
    try:
        shutil.copytree(cache, work / "cache")
        server = Server.kvtier(model, work / "cache", work / "kvtier.log", *DISK_PATH)
        server.start()
        try:
            warm_up(server, str(model))
            evict_files(work / "cache")
            timed = stream_chat(server, str(model), messages_for(system, QUESTIONS[3]))
            usage = timed.usage["kvtier"]
        finally:
            server.stop()
        evict_files(work / "cache")
        raw = raw_read(work / "cache" / "blocks")["gb_per_s"]
        return usage["restored_bytes"] / usage["restore_seconds"] / 1e9, raw, timed.ttft
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=16384)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    model = make_model(ROOT / ".models" / "llama", "llama")
    system = agent_system_prompt(args.prompt_tokens, AutoTokenizer.from_pretrained(str(model)), step=1)
    base = Path(tempfile.mkdtemp(prefix="kvtier-restore-base-"))
    try:
        cached_prefix(model, system, base / "cache")
        results = [trial(model, system, base / "cache") for _ in range(args.trials)]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    for restore, raw, ttft in results:
        print(f"restore {restore:.2f} GB/s, raw read {raw:.2f} GB/s: {100 * restore / raw:.0f}%; "
              f"the restoring request's TTFT {ttft:.2f} s")
    print(f"median: {100 * statistics.median(r / w for r, w, _ in results):.0f}% of the raw read")
    return 0


if __name__ == "__main__":
    sys.exit(main())
