"""Fault injection at scale, for docs/reliability.md: kill -9 at random moments many times,
then damage files and index entries; count what `kvtier verify` finds and repairs, and check
every answer against plain mlx-lm.

    python bench/faults.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from harness import ROOT, Server, machine_description, stream_chat, write_section
from tests.support.testmodels import make_model

MAX_TOKENS = 8


def prompt(i: int) -> list[dict]:
    system = f"You are agent {i}. " + "Read files, run tests, keep answers short. " * (20 + 7 * (i % 9))
    return [{"role": "system", "content": system}, {"role": "user", "content": f"Task {i}: fix the bug."}]


def verify(cache_dir: Path, *extra: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "daemon.cli", "verify", "--json", "--cache-dir", str(cache_dir),
                          *extra], cwd=ROOT, capture_output=True, text=True)
    return {"code": out.returncode, "kinds": Counter(p["kind"] for p in json.loads(out.stdout)["problems"])}


def kill_loop(server: Server, model: str, cache_dir: Path, rounds: int, rng: random.Random) -> list[dict]:
    results = []
    for i in range(rounds):
        server.start()
        worker = threading.Thread(target=_quietly, args=(stream_chat, server, model, prompt(i), MAX_TOKENS))
        worker.start()
        time.sleep(rng.uniform(0.2, 2.5))
        assert server.proc is not None  # started above
        server.proc.kill()
        server.proc.wait()
        server.proc = None
        worker.join()
        results.append(verify(cache_dir))
    return results


def _quietly(fn, *args):
    try:
        fn(*args)
    except Exception:
        pass


def damage(cache_dir: Path, rng: random.Random, each: int) -> Counter:
    files = sorted((cache_dir / "blocks").rglob("*.safetensors"))
    rng.shuffle(files)
    done: Counter = Counter()
    for kind, victims in (("bit flip", files[:each]), ("truncated", files[each:2 * each]),
                          ("deleted", files[2 * each:3 * each])):
        for path in victims:
            data = bytearray(path.read_bytes())
            if kind == "bit flip":
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
                path.write_bytes(bytes(data))
            elif kind == "truncated":
                path.write_bytes(bytes(data[: len(data) // 3]))
            else:
                path.unlink()
            done[kind] += 1
    import lmdb

    env = lmdb.open(str(cache_dir / "index"), max_dbs=8)
    db = env.open_db(b"blocks")
    with env.begin(write=True, db=db) as txn:
        keys = [bytes(k) for k, _ in txn.cursor()]
        for key in rng.sample(keys, min(each, len(keys))):
            txn.put(key, os.urandom(40))
            done["garbage index entry"] += 1
    env.close()
    return done


def answers_exact(server: Server, model_path: Path, count: int) -> tuple[int, int]:
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(model_path))
    exact = 0
    server.start()
    try:
        for i in range(count):
            got = stream_chat(server, str(model_path), prompt(i), MAX_TOKENS).text
            tokens = tokenizer.apply_chat_template(prompt(i), add_generation_prompt=True)
            exact += got == mlx_lm.generate(model, tokenizer, prompt=tokens, max_tokens=MAX_TOKENS)
        damaged = server.stats()["counters"].get("damaged_blocks", 0)
    finally:
        server.stop()
    return exact, damaged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--damage-each", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(2026)
    model = make_model(ROOT / ".models" / "llama", "llama")
    work = Path(tempfile.mkdtemp(prefix="kvtier-faults-"))
    try:
        server = Server.kvtier(model, work / "cache", work / "kvtier.log", "--block-size", "64")
        rounds = kill_loop(server, str(model), work / "cache", args.rounds, rng)
        verify(work / "cache", "--fix")  # what the kills left, so that `found` below is the damage only
        exact_kills, _ = answers_exact(server, model, args.rounds)
        injected = damage(work / "cache", rng, args.damage_each)
        exact_damage, damaged_seen = answers_exact(server, model, args.rounds)
        found = verify(work / "cache")
        fixed = verify(work / "cache", "--fix")
        clean = verify(work / "cache")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    kill_problems: Counter = sum((r["kinds"] for r in rounds), Counter())
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {machine_description()}. "
        f"Command: `python bench/faults.py --rounds {args.rounds} --damage-each {args.damage_each}`", "",
        "| fault | injected | found by `kvtier verify` | answers equal to plain mlx-lm afterwards |",
        "|---|---:|---|---:|",
        f"| kill -9 at a random moment (0.2-2.5 s into a request: prefill, decode or the background write) "
        f"| {args.rounds} | after each kill: {dict(kill_problems) or 'no problems'}; "
        f"clean rounds {sum(r['code'] == 0 for r in rounds)}/{args.rounds} "
        f"| {exact_kills}/{args.rounds} |",
        *(f"| {kind} | {n} | | |" for kind, n in injected.items()),
        f"| all damage above, then serving | | {dict(found['kinds'])}; the daemon counted "
        f"{damaged_seen} damaged files as misses while serving | {exact_damage}/{args.rounds} |", "",
        "While serving, the daemon itself drops every damaged entry it meets, so `verify` "
        "afterwards finds only the ones no request touched.",
        f"`verify --fix` after the damage exited {fixed['code']}; a second `verify` then found "
        f"{dict(clean['kinds']) or 'no problems'} (exit {clean['code']}).",
    ]
    section = "\n".join(lines)
    print(section)
    write_section("faults", section, ROOT / "docs" / "reliability.md")
    return 0 if exact_kills == exact_damage == args.rounds and clean["code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
