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

from harness import ROOT, Server, stream_chat
from prompts import QUESTIONS, agent_system_prompt, messages_for
from scenarios.restore_bandwidth import restore_trial
from tests.support.testmodels import make_model


def cached_prefix(model: Path, system: str, cache: Path) -> None:
    server = Server.kvtier(model, cache, cache.parent / "cold.log")
    server.start()
    try:
        stream_chat(server, str(model), messages_for(system, QUESTIONS[0]))
    finally:
        server.stop()  # SIGTERM writes every block


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
        results = [restore_trial(model, system, base / "cache", base / f"trial-{i}") for i in range(args.trials)]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    for r in results:
        print(f"restore {r['restore_gb_per_s']:.2f} GB/s, raw read {r['raw_read']['gb_per_s']:.2f} GB/s "
              f"({100 * r['ratio']:.0f}%), 4 files at a time {r['parallel_read']['gb_per_s']:.2f} GB/s "
              f"({100 * r['parallel_ratio']:.0f}%); the restoring request's TTFT {r['restored']['ttft']:.2f} s")
    print(f"median: {100 * statistics.median(r['ratio'] for r in results):.0f}% of the raw read, "
          f"{100 * statistics.median(r['parallel_ratio'] for r in results):.0f}% of 4 files at a time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
