"""Which model a request's `model` name selects (daemon/model_names.py): exact names, glob
aliases, `--allow-any-model` repo ids from the Hugging Face cache, the default model, strict."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from daemon.cli import build_parser, serve_config
from daemon.client_names import MAX_REMEMBERED, MAX_SHOWN
from daemon.errors import ApiError
from daemon.model_names import ModelNames, parse_alias
from kvtier.config import ModelSpec

CODER = "/models/Qwen3-Coder-30B"
SMALL = "mlx-community/Qwen3-4B-4bit"


def two_models(**options) -> ModelNames:
    return ModelNames([ModelSpec(CODER, name="coder", aliases=["claude-*", "big"]),
                       ModelSpec(SMALL, aliases=["claude-*haiku*", "fast", "claude-3-5-haiku"])],
                      **options)


def served_by(names: ModelNames, requested: str) -> str:
    spec, echoed = names.resolve(requested)
    assert echoed == requested  # a response always echoes the requested name
    return spec.name


def test_exact_names_of_each_model():
    names = two_models()
    for name in ("coder", "big", CODER, "Qwen3-Coder-30B", "default"):
        assert served_by(names, name) == "coder" and names.spec_named(name) is names.specs[0]
    for name in (SMALL, "fast", "Qwen3-4B-4bit", "claude-3-5-haiku"):
        assert served_by(names, name) == SMALL and names.spec_named(name) is names.specs[1]
    assert names.spec_named("claude-*") is None and names.spec_named("claude-opus-4") is None
    assert names.known() == {"default", "coder", "big", CODER, "Qwen3-Coder-30B", SMALL, "fast",
                             "Qwen3-4B-4bit", "claude-3-5-haiku"}


def test_exact_beats_glob_and_the_most_specific_glob_wins_whatever_the_order():
    names = two_models()
    # "claude-3-5-haiku" matches both models' globs, but is the small model's exact alias
    assert served_by(names, "claude-3-5-haiku") == SMALL
    # the coder's "claude-*" comes first, but "claude-*haiku*" says more
    assert served_by(names, "claude-haiku-4-5") == SMALL
    assert served_by(names, "claude-sonnet-4-5") == "coder"
    reordered = ModelNames([ModelSpec(SMALL, aliases=["claude-*haiku*"]),
                            ModelSpec(CODER, name="coder", aliases=["claude-*"])])
    assert served_by(reordered, "claude-haiku-4-5") == SMALL
    assert served_by(reordered, "claude-sonnet-4-5") == "coder"


def test_of_equally_specific_globs_the_first_configured_wins():
    first, second = ModelSpec("/m/a", aliases=["gpt-*"]), ModelSpec("/m/b", aliases=["gpt?5*", "*-mini"])
    names = ModelNames([first, second])
    assert names.resolve("gpt-5-codex")[0] is first  # "gpt-*" and "gpt?5*": 4 literal characters each
    assert names.resolve("gpt-5-mini")[0] is second  # "*-mini": 5
    assert ModelNames([second, first]).resolve("gpt-5-codex")[0] is second


def test_a_more_explicit_name_wins_over_another_models_directory_name():
    names = ModelNames([ModelSpec("/a/fast"), ModelSpec("/b/other", name="fast")])
    assert served_by(names, "fast") == "fast"
    assert served_by(names, "/a/fast") == "/a/fast"


def test_unknown_names_go_to_the_default_model_logged_once(caplog):
    caplog.set_level(logging.INFO, logger="kvtier.models")
    names = two_models()
    for _ in range(2):
        assert served_by(names, "gpt-5-codex") == "coder"
    assert caplog.text.count("requests for model 'gpt-5-codex' are served by coder") == 1
    assert served_by(names, "org/not-configured") == "coder"  # a repo id without --allow-any-model


def test_a_logged_name_is_escaped_cut_short_and_only_so_many_are_remembered(caplog):
    """A model name is the client's text: a line break in it forged a log line, a 100 KB one
    was logged whole, and every new name was remembered for good (memory without bound)."""
    caplog.set_level(logging.INFO, logger="kvtier.models")
    names = two_models()
    forged = "gpt\n2026-12-08 00:00:00,000 ERROR kvtier.daemon: forged"
    assert served_by(names, forged) == "coder"
    assert served_by(names, "x" * 100_000) == "coder"
    forged_line, long_line = (record.getMessage() for record in caplog.records)
    assert forged_line == f"requests for model {forged!r} are served by coder"
    assert long_line == f"requests for model {'x' * MAX_SHOWN!r}... are served by coder"
    for n in range(MAX_REMEMBERED):
        assert served_by(names, f"gpt-{n}") == "coder"  # served, whether logged or not
    assert len(caplog.records) == MAX_REMEMBERED  # the first names, then no more


def test_strict_names_refuse_what_matches_nothing():
    names = two_models(strict=True)
    assert served_by(names, "claude-opus-4-1") == "coder"  # globs are configured names
    with pytest.raises(ApiError) as err:
        names.resolve("gpt-5")
    assert err.value.status == 404 and err.value.code == "model_not_found"
    assert err.value.param == "model"
    assert err.value.message == (f"model 'gpt-5' is not served here; this daemon serves 'coder', "
                                 f"'{SMALL}' (or use 'default')")


def test_listed_names_each_model_then_its_exact_aliases_once():
    names = ModelNames([ModelSpec(CODER, name="coder", aliases=["claude-*", "big", "coder", "big"]),
                        ModelSpec(SMALL, aliases=["fast"])])
    assert names.listed() == ["coder", "big", SMALL, "fast"]


def hf_cache_with(tmp_path: Path, repo_id: str, model: Path) -> Path:
    """A Hugging Face hub cache holding `model` as repo_id's main revision, in the layout
    huggingface_hub writes (models--org--name/refs/main, snapshots/<commit>/)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(model, repo / "snapshots" / commit)
    return tmp_path / "hub"


@pytest.fixture
def hub_cache(tmp_path, tiny_model, monkeypatch):
    from huggingface_hub import constants

    cache = hf_cache_with(tmp_path, "kvtier-test/cached-model", tiny_model)
    # huggingface_hub reads HF_HUB_CACHE when it is imported: set what it read
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_allow_any_model_serves_a_repo_id_from_the_hf_cache(hub_cache):
    names = two_models(allow_any=True, offline=True, strict=True)
    spec, echoed = names.resolve("kvtier-test/cached-model")
    assert (spec.source, spec.name, echoed) == ("kvtier-test/cached-model",) * 3
    assert spec not in names.specs and names.found == [spec]
    assert names.resolve("kvtier-test/cached-model")[0] is spec  # created once, kept
    assert names.spec_named("kvtier-test/cached-model") is spec
    assert names.spec_named("cached-model") is None  # its directory name is no name of its own
    assert names.listed()[-1] == "kvtier-test/cached-model"
    # offline, a repo id not in the cache is no model: strict refuses it
    with pytest.raises(ApiError):
        names.resolve("kvtier-test/not-cached")
    assert served_by(two_models(allow_any=True, offline=True), "kvtier-test/not-cached") == "coder"
    names.forget(spec)
    assert names.spec_named("kvtier-test/cached-model") is None


def test_allow_any_model_online_takes_any_repo_id_for_the_loader_to_fetch(hub_cache):
    names = two_models(allow_any=True)
    assert served_by(names, "kvtier-test/on-the-hub") == "kvtier-test/on-the-hub"
    # globs come first; names that are no repo id (paths, "claude-…") are never loaded
    assert served_by(names, "claude-x/y") == "coder"
    for name in ("/etc/model", "../up/model", "a/b/c", "org/..", "gpt-5"):
        assert served_by(names, name) == "coder", name
    assert [spec.name for spec in names.found] == ["kvtier-test/on-the-hub"]


def test_allow_any_model_without_it_leaves_the_hf_cache_alone(hub_cache):
    assert served_by(two_models(), "kvtier-test/cached-model") == "coder"


def test_model_alias_flag_attaches_to_any_configured_model():
    names = two_models()
    assert parse_alias("house", names) == ("house", names.specs[0])
    assert parse_alias("tiny=fast", names) == ("tiny", names.specs[1])
    assert parse_alias(f"tiny={SMALL}", names) == ("tiny", names.specs[1])
    with pytest.raises(ValueError, match="no model 'other' is configured"):
        parse_alias("x=other", names)
    with pytest.raises(ValueError, match="give NAME or NAME=MODEL"):
        parse_alias("=fast", names)


def test_serve_flags_give_one_model_its_aliases():
    config = serve_config(build_parser().parse_args(
        ["serve", "--model", "/m/llama", "--model-alias", "house", "--model-alias", "coder=llama",
         "--model-alias", "claude-*"]))
    (spec,) = config.models
    assert (spec.source, spec.name, spec.aliases) == ("/m/llama", "/m/llama", ["house", "coder", "claude-*"])
    with pytest.raises(ValueError, match="no model 'other'"):
        serve_config(build_parser().parse_args(["serve", "--model", "m", "--model-alias", "a=other"]))
