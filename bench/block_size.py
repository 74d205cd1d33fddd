"""Pick the default block size by measurement: restore time after a restart, and disk
traffic over a multi-turn agent session, for several block sizes (in-process engine).

    python bench/block_size.py        (writes docs/bench/block_size.json and a table)
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from harness import ROOT, machine_description
from kvtier.config import CacheConfig
from kvtier.engine import Engine
from kvtier.requests import GenerationRequest
from kvtier.scheduler import generate
from prompts import agent_system_prompt
from tests.support.testmodels import make_model

SIZES = [32, 64, 128, 256, 512, 1024]
TURNS = 6


def run(engine: Engine, messages: list[dict]) -> tuple[str, float]:
    chunks = list(generate(engine, GenerationRequest(engine.renderer.chat_tokens(messages), 16, temperature=0)))
    usage = chunks[-1].usage
    assert usage is not None  # the last chunk carries it
    return "".join(c.text for c in chunks), usage.prefill_seconds


def measure(model: Path, block_size: int, system: str) -> dict:
    cache_dir = Path(tempfile.mkdtemp(prefix=f"kvtier-bs{block_size}-"))
    try:
        config = lambda: CacheConfig(cache_dir=cache_dir, block_size=block_size)  # noqa: E731
        engine = Engine(str(model), config())
        messages = [{"role": "system", "content": system}, {"role": "user", "content": "Start."}]
        run(engine, messages)
        engine.close()
        engine = Engine(str(model), config())  # a restart: only the disk tier is warm
        restore = min(run(engine, messages)[1] for _ in range(1))
        written_before = engine.store.counters["disk_bytes_written"]
        for turn in range(TURNS):
            text, _ = run(engine, messages)
            messages += [{"role": "assistant", "content": text},
                         {"role": "user", "content": f"Tool output {turn}: ok. Continue."}]
        engine.store.flush()
        written = engine.store.counters["disk_bytes_written"] - written_before
        files = engine.store.index.totals()[1]
        engine.close()
        return {"block_size": block_size, "restore_ttft": restore,
                "bytes_written_per_turn": written / TURNS, "files": files}
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def main() -> int:
    from transformers import AutoTokenizer

    model = make_model(ROOT / ".models" / "llama", "llama")
    system = agent_system_prompt(3400, AutoTokenizer.from_pretrained(str(model)))
    rows = [measure(model, size, system) for size in SIZES]
    lines = [f"Measured on {machine_description()}; generated llama 512/8 float32, ~3,600-token prompt, "
             f"{TURNS} follow-up turns. Command: `python bench/block_size.py`", "",
             "| block size | TTFT after restart | disk bytes written per turn | files for the session |",
             "|---:|---:|---:|---:|"]
    lines += [f"| {r['block_size']} | {r['restore_ttft']:.3f} s | {r['bytes_written_per_turn'] / 2**20:.2f} MiB "
              f"| {r['files']} |" for r in rows]
    print("\n".join(lines))
    out = ROOT / "docs" / "bench" / "block_size.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
