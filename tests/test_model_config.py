"""The models `kvtier serve` is given (daemon/model_config.py): repeated `--model [NAME=]SOURCE`,
a TOML `--models-file`, and the flags of the memory they share; a bad models file stops the
real CLI with one line and exit 2."""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

from daemon.cli import build_parser, serve_config
from daemon.model_config import parse_model_flag
from kvtier.config import ModelSpec
from tests.conftest import ROOT, free_port

CODER = "mlx-community/Qwen3-Coder-30B-A3B-Instruct-4bit"
SMALL = "mlx-community/Qwen3-4B-Instruct-2507-4bit"


def config_of(*flags: str):
    return serve_config(build_parser().parse_args(["serve", *flags]))


MODELS_FILE = f'''
default = "small"

[[models]]
source = "{CODER}"
name = "coder"
aliases = ["claude-*"]
max_context = 65536
pin = true

[[models]]
source = "{SMALL}"
name = "small"
aliases = ["claude-*haiku*", "fast"]
kv_bits = 8
kv_group_size = 32
'''


def test_repeated_model_flags_the_first_is_the_default(tmp_path):
    local = tmp_path / "my-model"
    local.mkdir()
    config = config_of("--model", f"coder={CODER}", "--model", str(local), "--model", f"small={local}")
    assert [(m.name, m.source) for m in config.models] == [
        ("coder", CODER), (str(local), str(local)), ("small", str(local))]
    assert config.model == CODER


def test_a_name_is_split_off_only_where_the_rest_is_a_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "odd=dir").mkdir()
    (tmp_path / "data").mkdir()
    assert parse_model_flag("odd=dir") == ModelSpec("odd=dir")  # an existing path is never split
    assert parse_model_flag("x=data") == ModelSpec("data", name="x")  # the rest exists
    assert parse_model_flag(f"x={CODER}") == ModelSpec(CODER, name="x")  # a repo id
    assert parse_model_flag("x=~/models/q") == ModelSpec("~/models/q", name="x")  # a path's look
    assert parse_model_flag("/models/a=b/q") == ModelSpec("/models/a=b/q")  # '/' before '='
    assert parse_model_flag("a=b") == ModelSpec("a=b")  # 'b' is neither a path nor a repo id


def test_a_models_file_gives_names_aliases_options_and_the_default(tmp_path):
    models = tmp_path / "models.toml"
    models.write_text(MODELS_FILE)
    config = config_of("--models-file", str(models))
    assert config.models == [
        ModelSpec(SMALL, name="small", aliases=["claude-*haiku*", "fast"], kv_bits=8, kv_group_size=32),
        ModelSpec(CODER, name="coder", aliases=["claude-*"], max_context=65536, pin=True)]
    assert config.model == SMALL


def test_model_flags_come_before_the_files_models(tmp_path):
    models = tmp_path / "models.toml"
    models.write_text(MODELS_FILE.replace('default = "small"', ""))
    config = config_of("--model", "first=/m/first", "--models-file", str(models), "--model-alias", "tiny=small")
    assert [m.name for m in config.models] == ["first", "coder", "small"]
    assert config.models[2].aliases == ["claude-*haiku*", "fast", "tiny"]


def test_a_relative_source_beside_the_models_file_is_taken_from_there(tmp_path, monkeypatch):
    (tmp_path / "conf" / "weights").mkdir(parents=True)
    (tmp_path / "conf" / "models.toml").write_text('[[models]]\nsource = "weights"\n'
                                                   '[[models]]\nsource = "org/repo"\n')
    monkeypatch.chdir(tmp_path)
    config = config_of("--models-file", "conf/models.toml")
    assert [m.source for m in config.models] == [str(tmp_path / "conf" / "weights"), "org/repo"]


def test_the_memory_flags():
    default = config_of("--model", "m")
    assert default.memory_budget == psutil.virtual_memory().total * 3 // 4
    assert default.keep_alive is None and not default.allow_any_model and not default.offline
    given = config_of("--model", "m", "--memory-budget", "24GiB", "--keep-alive", "5m",
                      "--allow-any-model", "--offline")
    assert (given.memory_budget, given.keep_alive) == (24 * 2**30, 300.0)
    assert given.allow_any_model and given.offline
    assert config_of("--model", "m", "--keep-alive", "never").keep_alive is None


@pytest.mark.parametrize("flags, message", [
    ([], "give a model: --model PATH_OR_REPO or --models-file FILE"),
    (["--model", "a=/m/x", "--model", "a=/m/y"], "the name 'a' is given to two models: /m/x and /m/y"),
    (["--model", "/m/x", "--model", "/m/y", "--model-alias", "fast", "--model-alias", "fast=y"],
     "the name 'fast' is given to two models"),
    (["--model", "/m/x", "--model-alias", "fast=nothing"], "no model 'nothing' is configured"),
])
def test_bad_model_flags_are_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        config_of(*flags)


def test_a_bad_keep_alive_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--model", "m", "--keep-alive", "soon"])
    assert "not a duration: 'soon'" in capsys.readouterr().err


BAD_FILES = {
    "unknown-key": ('[[models]]\nsource = "m"\npinned = true\n',
                    "[[models]] #1: unknown key 'pinned' (known: source, name, aliases, max_context, "
                    "kv_bits, kv_group_size, pin)"),
    "bad-value": ('[[models]]\nsource = "m"\n[[models]]\nsource = "n"\nkv_bits = 7\n',
                  "[[models]] #2: 'kv_bits' must be one of 2, 3, 4, 5, 6, 8, not 7"),
    "not-a-list": ('[[models]]\nsource = "m"\naliases = "fast"\n', "'aliases' must be a list of names"),
    "no-source": ('[[models]]\nname = "m"\n', "[[models]] #1: 'source' is missing"),
    "top-key": ('model = "m"\n', "unknown key 'model' (known: default, models)"),
    "default": ('default = "zz"\n[[models]]\nsource = "m"\n', "'default' names no model: 'zz' (models: m)"),
    "not-toml": ('[[models]\nsource = "m"\n', "is not valid TOML: "),
    "empty": ("", "give a model: --model PATH_OR_REPO or --models-file FILE (the models file"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_models_file_stops_serve_with_one_line_and_exit_2(tmp_path, case):
    content, message = BAD_FILES[case]
    path = tmp_path / f"{case}.toml"
    path.write_text(content)
    done = subprocess.run([sys.executable, "-m", "daemon.cli", "serve", "--models-file", str(path),
                           "--port", str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("kvtier: ")
    assert message in done.stderr and (case == "empty" or f"models file {path}" in done.stderr)


def test_a_missing_models_file_is_named():
    with pytest.raises(ValueError, match="cannot read the models file /no/such.toml: No such file"):
        config_of("--models-file", "/no/such.toml")


def test_serve_fetches_every_model_before_it_starts(tmp_path):
    """Each configured model is found (or downloaded) before the daemon starts: a second
    model that is nowhere stops it at once, naming that model."""
    first = tmp_path / "first"
    first.mkdir()
    (first / "config.json").write_text('{"model_type": "llama"}')
    done = subprocess.run([sys.executable, "-m", "daemon.cli", "serve", "--model", str(first),
                           "--model", f"second={tmp_path / 'missing'}", "--model", f"third={first}",
                           "--offline", "--port", str(free_port())],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr == f"kvtier: no model directory at '{tmp_path / 'missing'}'\n"


def test_the_documented_models_file_and_claude_code_example_route_as_they_say(tmp_path):
    import re
    import shlex

    from daemon.model_names import ModelNames

    operations = (ROOT / "docs" / "operations.md").read_text()
    (toml,) = re.findall(r"```toml\n(.*?)```", operations, re.S)
    (tmp_path / "models.toml").write_text(toml)
    readme = (ROOT / "README.md").read_text()
    (command,) = [block for block in re.findall(r"```sh\n(.*?)```", readme, re.S)
                  if "--model-alias 'claude-*haiku*=small'" in block]
    for flags in (["--models-file", str(tmp_path / "models.toml")],
                  shlex.split(command.replace("\\\n", " "))[2:]):
        names = ModelNames(config_of(*flags).models)
        assert [spec.name for spec in names.specs] == ["coder", "small"]
        assert names.resolve("claude-haiku-4-5-20251001")[0].name == "small"
        assert names.resolve("claude-sonnet-4-5-20250929")[0].name == "coder"
        assert names.resolve("gpt-5-codex")[0].name == "coder"  # the default
