"""The shared tier on loopback: a second machine's first request restored from Redis, against
a cold prefill and against a restore from its own SSD; and the shared restore's bytes/s
against a raw GET of the same values.

Daemon A computes an agent system prompt and uploads it; daemon B (its own cache directory,
the same Redis) answers a new question on that prompt from the shared tier; B restarted
answers another from its local SSD (the blocks it kept); daemon C (no shared tier, empty
cache) gives the cold TTFT. Needs redis-server (or valkey-server) on PATH.

    python bench/shared.py [--prompt-tokens 4096] [--write]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import DISK_PATH, ROOT, Server, free_port, machine_description, stream_chat, warm_up, write_section
from prompts import QUESTIONS, agent_system_prompt, messages_for
from tests.support.testmodels import make_model


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    import redis

    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:
        raise SystemExit("bench/shared.py needs redis-server (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            return proc, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            time.sleep(0.05)
    raise TimeoutError("redis-server did not start")


def wait_for_uploads(server: Server, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        stats = server.stats()
        if stats["shared"]["queued_uploads"] == 0 and stats["counters"].get("shared_uploads", 0):
            return
        time.sleep(0.1)
    raise TimeoutError("uploads did not finish")


def raw_get(url: str, fingerprint: str) -> dict:
    """Every value of the model's namespace fetched with plain sequential GETs: the bytes/s
    the store and the loopback give, with nothing checked or restored."""
    import redis

    from kvtier.shared import namespace

    client = redis.Redis.from_url(url)
    names = list(client.scan_iter(match=namespace(fingerprint) + "b:*"))
    started = time.perf_counter()
    total = sum(len(client.get(name) or b"") for name in names)  # a value evicted meanwhile: none
    seconds = time.perf_counter() - started
    return {"values": len(names), "bytes": total, "seconds": seconds, "gb_per_s": total / seconds / 1e9}


def run(prompt_tokens: int, work: Path) -> dict:
    from transformers import AutoTokenizer

    model = make_model(ROOT / ".models" / "llama", "llama")
    system = agent_system_prompt(prompt_tokens, AutoTokenizer.from_pretrained(str(model)), step=1)
    redis_proc, url = start_redis(work)
    try:
        first = Server.kvtier(model, work / "a", work / "a.log", "--shared", url).start()
        try:
            warm_up(first, str(model))
            stream_chat(first, str(model), messages_for(system, QUESTIONS[0]))
            wait_for_uploads(first)
            fingerprint = first.stats()["fingerprint"]
        finally:
            first.stop()
        second = Server.kvtier(model, work / "b", work / "b.log", "--shared", url, *DISK_PATH).start()
        try:
            warm_up(second, str(model))
            from_shared = stream_chat(second, str(model), messages_for(system, QUESTIONS[1]))
            second.restart()  # SIGTERM writes what it kept; RAM starts empty
            warm_up(second, str(model))
            from_ssd = stream_chat(second, str(model), messages_for(system, QUESTIONS[2]))
        finally:
            second.stop()
        cold_server = Server.kvtier(model, work / "c", work / "c.log").start()
        try:
            warm_up(cold_server, str(model))
            cold = stream_chat(cold_server, str(model), messages_for(system, QUESTIONS[1]))
        finally:
            cold_server.stop()
        raw = raw_get(url, fingerprint)
    finally:
        redis_proc.terminate()
        redis_proc.wait()
    usage = from_shared.usage["kvtier"]
    return {
        "prompt_tokens": from_shared.usage["prompt_tokens"], "machine": machine_description(),
        "ttft": {"cold": cold.ttft, "shared": from_shared.ttft, "local_ssd": from_ssd.ttft},
        "shared_tokens": usage["shared_tokens"], "computed_tokens": usage["computed_tokens"],
        "local_ssd_tokens": from_ssd.usage["kvtier"]["disk_tokens"],
        "shared_restore_gb_per_s": usage["restored_bytes"] / usage["restore_seconds"] / 1e9,
        "raw_get": raw, "same_text": from_shared.text == cold.text,
    }


def section(result: dict) -> str:
    ttft = result["ttft"]
    share = 100 * ttft["shared"] / ttft["cold"]
    return "\n".join([
        "## The shared tier (Redis on loopback)", "",
        f"`bench/shared.py`, {result['prompt_tokens']} prompt tokens, {result['machine']}. "
        "The second daemon's first request on the first one's system prompt (a new question):", "",
        "| second daemon's request | TTFT | prompt tokens restored |", "|---|---|---|",
        f"| cold prefill (no cache) | {ttft['cold']:.3f} s | 0 |",
        f"| from the shared tier | {ttft['shared']:.3f} s ({share:.1f}% of cold) | {result['shared_tokens']} |",
        f"| from its local SSD (after a restart) | {ttft['local_ssd']:.3f} s | {result['local_ssd_tokens']} |", "",
        f"Shared restore: {result['shared_restore_gb_per_s']:.2f} GB/s (checked and copied into the "
        f"prompt cache) against a raw sequential `GET` of every value the store holds for the model ({result['raw_get']['values']}): "
        f"{result['raw_get']['gb_per_s']:.2f} GB/s. Same text as the cold run: {result['same_text']}.",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=4096)
    parser.add_argument("--write", action="store_true", help="write docs/bench/shared.json and docs/benchmarks.md")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kvtier-shared-"))
    try:
        result = run(args.prompt_tokens, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    print(section(result))
    if args.write:
        (ROOT / "docs" / "bench" / "shared.json").write_text(json.dumps(result, indent=2) + "\n")
        write_section("shared", section(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
