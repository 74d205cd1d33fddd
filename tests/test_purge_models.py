"""`kvtier purge --model X` in a cache several models wrote: X is a name the model was served
by (as the index records it, as `stats` and `ls` show it), its directory name, or the start
of its fingerprint; a name two models share is refused, listing them, and removes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from kvtier.cached_models import UnknownModel, select
from kvtier.local import LocalDisk
from tests.conftest import ROOT, TEST_BLOCK_SIZE, agent_messages, model_variant


def kvtier(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon.cli", *args], cwd=ROOT, input=input,
                          capture_output=True, text=True, timeout=600)


def entries_by_name(cache_dir: Path) -> Counter:
    with LocalDisk.existing(cache_dir) as cache:
        names = {fp: model["name"] for fp, model in cache.index.models().items()}
        return Counter(names[record.fingerprint] for record in cache.records().values())


@pytest.fixture
def three_models_cache(tmp_path, tiny_model):
    """A cache directory `kvtier warm` filled with three models' blocks: the tiny model, and
    two variants of it that share the directory name "coder" (another config.json each)."""
    models = [tiny_model]
    for n, parent in enumerate(("a", "b")):
        (tmp_path / parent).mkdir()
        models.append(model_variant(tiny_model, tmp_path / parent / "coder", "config.json",
                                    lambda config, n=n: config.update(kvtier_test_variant=n)))
    cache_dir = tmp_path / "cache"
    system = agent_messages("alpha")[0]["content"]
    for model in models:
        warmed = kvtier("warm", "--model", str(model), "-", "--cache-dir", str(cache_dir),
                        "--block-size", str(TEST_BLOCK_SIZE), input=system)
        assert warmed.returncode == 0, warmed.stderr
    return cache_dir, [str(model) for model in models]


def test_purge_by_the_names_the_models_were_served_by(three_models_cache):
    cache_dir, (tiny, coder_a, coder_b) = three_models_cache
    cache = str(cache_dir)
    before = entries_by_name(cache_dir)
    assert set(before) == {tiny, coder_a, coder_b} and all(before.values())
    listed = json.loads(kvtier("ls", "--cache-dir", cache, "--json").stdout)
    assert {entry["model"] for entry in listed} == {tiny, coder_a, coder_b}  # the names purge takes

    ambiguous = kvtier("purge", "--model", "coder", "--cache-dir", cache)
    assert ambiguous.returncode == 2 and ambiguous.stderr.count("\n") == 1
    assert "'coder' names more than one model" in ambiguous.stderr
    assert coder_a in ambiguous.stderr and coder_b in ambiguous.stderr
    assert entries_by_name(cache_dir) == before  # nothing removed

    by_path = kvtier("purge", "--model", coder_a, "--cache-dir", cache, "--json")
    assert by_path.returncode == 0, by_path.stderr
    assert json.loads(by_path.stdout)["removed"] == before[coder_a]
    assert entries_by_name(cache_dir) == Counter({tiny: before[tiny], coder_b: before[coder_b]})

    assert kvtier("purge", "--model", "coder", "--cache-dir", cache).returncode == 0  # one left
    assert entries_by_name(cache_dir) == Counter({tiny: before[tiny]})
    assert kvtier("purge", "--model", Path(tiny).name, "--cache-dir", cache).returncode == 0
    assert entries_by_name(cache_dir) == Counter()


def test_all_with_a_model_removes_that_models_pinned_entries_and_no_other_models(three_models_cache):
    """`purge --model M` keeps M's pinned entries and points to --all; `--model M --all` then
    removes M's entries, pinned included, and leaves the other models' (it removed every
    model's: `all` dropped the filter)."""
    cache_dir, (tiny, coder_a, coder_b) = three_models_cache
    cache = str(cache_dir)
    listed = json.loads(kvtier("ls", "--cache-dir", cache, "--json").stdout)
    key = next(entry["key"] for entry in listed if entry["model"] == coder_a)
    assert kvtier("pin", key, "--cache-dir", cache).returncode == 0
    before = entries_by_name(cache_dir)

    kept = kvtier("purge", "--model", coder_a, "--cache-dir", cache)
    assert kept.returncode == 0 and f"kept {before[coder_a]} pinned" in kept.stdout and "--all" in kept.stdout
    assert entries_by_name(cache_dir) == before  # the warmed prompt is one chain: all of it pinned

    purged = kvtier("purge", "--model", coder_a, "--all", "--cache-dir", cache)
    assert purged.returncode == 0, purged.stderr
    assert entries_by_name(cache_dir) == Counter({tiny: before[tiny], coder_b: before[coder_b]})


# What the index may record per fingerprint: the daemon's configured name, its source and aliases.
CODER_FP, CODER_OLD_FP, SMALL_FP = "a1" * 32, "a2" * 32, "b1" * 32
MODELS: dict[str, dict] = {
    CODER_FP: {"name": "coder", "source": "mlx-community/Qwen3-Coder-4bit", "aliases": ["big"],
               "path": "/hf/snapshots/0123abcd"},
    CODER_OLD_FP: {"name": "coder", "source": "mlx-community/Qwen3-Coder-4bit", "path": "/hf/snapshots/0123abcd"},
    SMALL_FP: {"name": "small", "source": "/models/Qwen3-4B", "path": "/models/Qwen3-4B"},
}


@pytest.mark.parametrize("selector, fingerprints", [
    ("coder", {CODER_FP, CODER_OLD_FP}),  # a name: every fingerprint of the model
    ("mlx-community/Qwen3-Coder-4bit", {CODER_FP, CODER_OLD_FP}),  # its source
    ("Qwen3-Coder-4bit", {CODER_FP, CODER_OLD_FP}),  # the source's directory name
    ("big", {CODER_FP}),  # an alias the newer fingerprint's daemon gave it
    ("small", {SMALL_FP}), ("/models/Qwen3-4B", {SMALL_FP}), ("Qwen3-4B", {SMALL_FP}),
    ("b1b1", {SMALL_FP}), (CODER_OLD_FP, {CODER_OLD_FP}),
])
def test_a_selector_names_one_model(selector, fingerprints):
    assert select(MODELS, set(MODELS), set(MODELS), selector) == fingerprints


@pytest.mark.parametrize("selector, message", [
    ("a", "'a' starts more than one model's fingerprint (coder [a1a1a1a1a1a1], coder [a2a2a2a2a2a2])"),
    ("0123abcd", "no cached model is named '0123abcd'"),  # a hub snapshot's directory: no name
    ("mistral", "no cached model is named 'mistral'"),
])
def test_a_selector_naming_none_or_several_is_refused(selector, message):
    with pytest.raises(UnknownModel) as err:
        select(MODELS, set(MODELS), set(MODELS), selector)
    assert str(err.value).startswith(message)


def test_a_name_shared_with_a_model_holding_no_entries_names_the_other():
    models = {CODER_FP: {"name": "/a/coder"}, SMALL_FP: {"name": "/b/coder"}}
    assert select(models, set(models), {SMALL_FP}, "coder") == {SMALL_FP}
    with pytest.raises(UnknownModel, match="'coder' names more than one model"):
        select(models, set(models), set(models), "coder")
