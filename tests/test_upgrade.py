"""Upgrading mlx-lm under a cache directory: the KV the old version computed is a clean miss
(the new one's text is plain mlx-lm's), `kvtier stats` lists the old entries apart, and
`kvtier purge --model FINGERPRINT` removes them alone. Upgrading kvtier: an older index is
rebuilt from the block files, which are reused. Real model, LMDB, files and CLI."""

from __future__ import annotations

import subprocess
import sys

import mlx_lm

from kvtier.config import CacheConfig
from kvtier.engine import Engine
from kvtier.ops import CacheDir, stats
from kvtier.requests import GenerationRequest
from kvtier.scheduler import generate
from tests.conftest import ROOT
from tests.support.blocks import as_an_older_kvtier_left_it

BLOCK = 16
MAX_TOKENS = 6


def answer(engine: Engine, tokens: list[int]) -> tuple[str, int]:
    chunks = list(generate(engine, GenerationRequest(tokens, MAX_TOKENS, temperature=0.0)))
    usage = chunks[-1].usage
    assert usage is not None  # the last chunk carries it
    return "".join(c.text for c in chunks), usage.cached_tokens


def kvtier(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "daemon.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_an_mlx_lm_upgrade_is_a_clean_miss_listed_apart_and_purged_alone(llama_model, reference, tmp_path,
                                                                          monkeypatch):
    config = CacheConfig(cache_dir=tmp_path / "cache", block_size=BLOCK)
    tokens = reference.chat_tokens([{"role": "user", "content": "Which blocks survive an upgrade? " * 4}])
    installed = mlx_lm.__version__
    monkeypatch.setattr(mlx_lm, "__version__", "0.0.1")  # the mlx-lm before the upgrade
    old = Engine(str(llama_model), config)
    try:
        answer(old, tokens)
    finally:
        old.close()  # every block on disk
    monkeypatch.setattr(mlx_lm, "__version__", installed)

    new = Engine(str(llama_model), config)
    try:
        assert new.fingerprint != old.fingerprint
        text, cached = answer(new, tokens)
        assert cached == 0  # nothing the old mlx-lm computed is reused
        assert text == reference.generate(tokens, MAX_TOKENS)
        assert answer(new, tokens) == (text, len(tokens) - 1)  # its own blocks are
    finally:
        new.close()

    cache_dir = str(tmp_path / "cache")
    with CacheDir(tmp_path / "cache") as cache:
        models = stats(cache.disk)["models"]
    assert {fp: m["runtime"]["mlx_lm"] for fp, m in models.items()} == {old.fingerprint: "0.0.1",
                                                                         new.fingerprint: installed}
    assert {m["model"] for m in models.values()} == {str(llama_model)}  # one model, two versions
    assert "mlx-lm 0.0.1" in kvtier("stats", "--cache-dir", cache_dir)

    kvtier("purge", "--model", old.fingerprint, "--cache-dir", cache_dir)
    with CacheDir(tmp_path / "cache") as cache:
        models = stats(cache.disk)["models"]
    assert models[old.fingerprint]["blocks"] == 0 and models[new.fingerprint]["blocks"] > 0


def test_an_older_kvtiers_index_is_rebuilt_and_its_blocks_answer_exactly(llama_model, reference, tmp_path):
    """Upgrading kvtier itself: an index from before schema versions is rebuilt from the
    block files at start-up, and the prompt's blocks are reused from disk with the answer
    plain mlx-lm gives."""
    config = CacheConfig(cache_dir=tmp_path / "cache", block_size=BLOCK)
    tokens = reference.chat_tokens([{"role": "user", "content": "Which blocks survive a kvtier upgrade? " * 4}])
    old = Engine(str(llama_model), config)
    try:
        answer(old, tokens)
    finally:
        old.close()  # every block on disk
    as_an_older_kvtier_left_it(tmp_path / "cache" / "index")

    new = Engine(str(llama_model), config)
    try:
        assert new.store.disk.rebuilder.wait(60) and new.store.counters["index_rebuilds"] == 1
        assert answer(new, tokens) == (reference.generate(tokens, MAX_TOKENS), len(tokens) - 1)
    finally:
        new.close()
