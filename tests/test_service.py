"""`kvtier service`: the LaunchAgent plist and the systemd unit as their own parsers and
verifiers read them, and the real CLI's dry runs, which must touch nothing."""

from __future__ import annotations

import configparser
import dataclasses
import json
import os
import plistlib
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daemon import service

ROOT = Path(__file__).resolve().parent.parent
SOME_MODEL = str(ROOT / "tests" / "fixtures")  # a directory that is there: install refuses one that is not


def make_spec(platform: str, home: Path, **options) -> service.ServiceSpec:
    return service.ServiceSpec(platform=platform, home=home, uid=501, python=sys.executable,
                               serve_args=service.serve_args(options), working_dir=ROOT,
                               cache_dir=options.get("cache_dir"))


def kvtier_service(*args: str, home: Path, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process, with HOME pointed at a temporary directory."""
    environ = {k: v for k, v in os.environ.items() if k != "XDG_CONFIG_HOME"}
    environ.update(HOME=str(home), PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, "-m", "daemon.cli", "service", *args], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=120)


def files_under(path: Path) -> list[Path]:
    return sorted(path.rglob("*"))


def assert_in_order(text: str, *parts: str) -> None:
    positions = [text.find(part) for part in parts]
    assert -1 not in positions, [p for p, i in zip(parts, positions) if i == -1]
    assert positions == sorted(positions), positions


# ---- the files ---------------------------------------------------------------------------

def test_plist_round_trips_with_program_and_keys(tmp_path):
    spec = make_spec("darwin", tmp_path, model="X", port=8500)
    plist = plistlib.loads(plistlib.dumps(service.launchd_plist(spec)))
    assert plist == plistlib.loads(service.service_file(spec).encode())
    assert plist["Label"] == "com.kvtier.daemon"
    assert plist["ProgramArguments"][:3] == [sys.executable, "-m", "daemon.cli"]
    assert "serve --model X --port 8500" in " ".join(plist["ProgramArguments"])
    assert plist["RunAtLoad"] is True and plist["KeepAlive"] is True
    logs = tmp_path / "Library" / "Logs" / "kvtier"
    assert Path(plist["StandardOutPath"]).parent == logs and Path(plist["StandardErrorPath"]).parent == logs
    assert plist["WorkingDirectory"] == str(ROOT)
    assert plist["EnvironmentVariables"]["PATH"].startswith(str(Path(sys.executable).parent) + ":")
    assert "KVTIER_CACHE_DIR" not in plist["EnvironmentVariables"]
    assert service.service_path(spec) == tmp_path / "Library" / "LaunchAgents" / "com.kvtier.daemon.plist"


def test_only_given_serve_options_are_written_and_cache_dir_sets_env(tmp_path):
    assert service.serve_args({"model": "m", "host": None, "kv_bits": 8, "ram_budget": "2GB"}) == \
        ("--model", "m", "--ram-budget", "2GB", "--kv-bits", "8")
    spec = make_spec("darwin", tmp_path, model="m", cache_dir="/data/kv")
    assert service.launchd_plist(spec)["EnvironmentVariables"]["KVTIER_CACHE_DIR"] == "/data/kv"
    assert "--cache-dir" in service.program_arguments(spec)


class CaseKeptParser(configparser.ConfigParser):
    def optionxform(self, optionstr: str) -> str:
        return optionstr  # systemd keys are case-sensitive


def test_unit_parses_with_expected_settings(tmp_path):
    spec = make_spec("linux", tmp_path, model="X", port=8500, cache_dir="/data/kv")
    unit = CaseKeptParser(strict=False, interpolation=None)
    unit.read_string(service.systemd_unit(spec))
    assert unit["Unit"]["After"] == "network.target" and unit["Unit"]["Description"]
    svc = unit["Service"]
    assert shlex.split(svc["ExecStart"]) == [sys.executable, "-m", "daemon.cli", "serve",
                                             "--model", "X", "--port", "8500", "--cache-dir", "/data/kv"]
    assert (svc["Restart"], svc["KillSignal"], svc["TimeoutStopSec"]) == ("on-failure", "SIGTERM", "60")
    assert svc["RestartSec"] == "2"  # restarted after a crash (SIGBUS), not within systemd's start limit
    assert svc["WorkingDirectory"] == str(ROOT)
    environment = re.findall(r"^Environment=(.*)$", service.systemd_unit(spec), re.M)
    assert [shlex.split(e)[0].split("=", 1)[0] for e in environment] == ["PATH", "KVTIER_CACHE_DIR"]
    assert unit["Install"]["WantedBy"] == "default.target"
    assert service.service_path(spec) == tmp_path / ".config" / "systemd" / "user" / "kvtier.service"
    xdg = service.ServiceSpec(**{**spec.__dict__, "config_home": tmp_path / "cfg"})
    assert service.service_path(xdg) == tmp_path / "cfg" / "systemd" / "user" / "kvtier.service"


def test_unit_quotes_awkward_words():
    words = ["/models/my model", "it's", "50%", "$HOME", "plain"]
    line = " ".join(service.systemd_word(w) for w in words)
    # systemd unescapes `%%` and `$$` itself; what is left is ordinary shell quoting.
    assert shlex.split(line.replace("%%", "%").replace("$$", "$")) == words
    assert "%%" in line and "$$HOME" in line


def test_systemd_analyze_verifies_the_unit(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    spec = make_spec("linux", tmp_path, model="/models/it's a model", port=8500, cache_dir="/tmp/kv cache")
    path = tmp_path / "kvtier.service"
    path.write_text(service.systemd_unit(spec))
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True,
                            timeout=60)
    if result.returncode != 0 and "kvtier.service" not in result.stderr:
        pytest.skip(f"systemd-analyze cannot run here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    assert "kvtier.service" not in result.stderr  # no warnings about our file either


# ---- the CLI -----------------------------------------------------------------------------

def test_install_dry_run_linux_prints_unit_and_commands_and_touches_nothing(tmp_path):
    result = kvtier_service("install", "--dry-run", "--platform", "linux", "--model", SOME_MODEL,
                            "--port", "8500", "--max-context", "8192", home=tmp_path)
    assert result.returncode == 0, result.stderr
    unit_path = tmp_path / ".config" / "systemd" / "user" / "kvtier.service"
    assert_in_order(result.stdout, str(unit_path), "[Service]",
                    "ExecStart=" + shlex.join([sys.executable, "-m", "daemon.cli", "serve", "--model",
                                               SOME_MODEL, "--port", "8500", "--max-context", "8192"]),
                    "WantedBy=default.target",
                    "systemctl --user daemon-reload", "systemctl --user enable --now kvtier.service",
                    "systemctl --user restart kvtier.service")
    assert "KVTIER_CACHE_DIR" not in result.stdout
    assert files_under(tmp_path) == []


def test_install_dry_run_honours_xdg_config_home_and_makes_paths_absolute(tmp_path):
    (tmp_path / "work" / "mdl").mkdir(parents=True)
    result = kvtier_service("install", "--dry-run", "--platform", "linux", "--model", "mdl",
                            "--cache-dir", "kv", home=tmp_path / "home", cwd=tmp_path / "work",
                            XDG_CONFIG_HOME=str(tmp_path / "cfg"))
    assert result.returncode == 0, result.stderr
    assert str(tmp_path / "cfg" / "systemd" / "user" / "kvtier.service") in result.stdout
    assert f"--model {tmp_path.resolve() / 'work' / 'mdl'}" in result.stdout
    assert f'Environment="KVTIER_CACHE_DIR={tmp_path.resolve() / "work" / "kv"}"' in result.stdout
    assert files_under(tmp_path) == [tmp_path / "work", tmp_path / "work" / "mdl"]


@pytest.mark.parametrize("model, missing", [("./nope", "work/nope"), ("fast=../nope", "/nope"),
                                            ("~/nope", "home/nope"), ("/nonexistent/model", "/nonexistent/model")])
def test_install_refuses_a_model_path_that_is_not_there(tmp_path, model, missing):
    """The service would start elsewhere and restart in a loop on it: said now, one line."""
    (tmp_path / "work").mkdir()
    (tmp_path / "home").mkdir()
    result = kvtier_service("install", "--dry-run", "--platform", "linux", "--model", model,
                            home=tmp_path / "home", cwd=tmp_path / "work")
    assert result.returncode == 2 and result.stdout == "" and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"kvtier: --model {model}: no model directory at '")
    assert result.stderr.rstrip().endswith(f"{missing}'"), result.stderr
    assert files_under(tmp_path / "home") == []


def test_install_keeps_a_repo_id_that_is_no_path(tmp_path):
    result = kvtier_service("install", "--dry-run", "--platform", "linux", "--model", "org/name",
                            "--model", "small=org/small", home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "serve --model org/name --model small=org/small" in result.stdout


def test_install_with_several_models_and_a_models_file(tmp_path):
    """Each --model is written in order, its path made absolute and its NAME= kept; the models
    file by its absolute path (its own relative sources are read beside it)."""
    work = tmp_path / "work"
    (work / "small").mkdir(parents=True)
    (work / "conf").mkdir()
    (work / "conf" / "models.toml").write_text('[[models]]\nsource = "org/large"\nname = "large"\n'
                                               'aliases = ["claude-*"]\n')
    result = kvtier_service("install", "--dry-run", "--platform", "linux", "--model", "fast=small",
                            "--model", "org/repo", "--models-file", "conf/models.toml",
                            "--model-alias", "claude-*haiku*=fast", "--keep-alive", "5m",
                            "--memory-budget", "24GiB", "--allow-any-model", "--shared-ttl", "7d",
                            home=tmp_path / "home", cwd=work)
    assert result.returncode == 0, result.stderr
    (exec_start,) = [line for line in result.stdout.splitlines() if line.startswith("ExecStart=")]
    assert shlex.split(exec_start.removeprefix("ExecStart="))[4:] == [
        "--model", f"fast={work.resolve() / 'small'}", "--model", "org/repo",
        "--models-file", str(work.resolve() / "conf" / "models.toml"),
        "--memory-budget", "24GiB", "--keep-alive", "5m", "--model-alias", "claude-*haiku*=fast",
        "--allow-any-model", "--shared-ttl", "7d"]
    # what the service runs, as `serve` reads it
    from daemon.cli import build_parser, serve_config
    config = serve_config(build_parser().parse_args(shlex.split(exec_start.removeprefix("ExecStart="))[3:]))
    assert [(m.name, m.aliases) for m in config.models] == [
        ("fast", ["claude-*haiku*"]), ("org/repo", []), ("large", ["claude-*"])]
    assert (config.keep_alive, config.cache.shared_ttl) == (300.0, 7 * 86400.0)


@pytest.mark.parametrize("models, message", [
    ('[[models]]\nsource = "m"\nkv_bits = 7\n', "[[models]] #1: 'kv_bits' must be one of 2, 3, 4, 5, 6, 8, not 7"),
    ('[[models]]\nsource = "m"\n', "no model 'other' is configured"),
])
def test_install_refuses_a_bad_models_file_or_alias_and_writes_nothing(tmp_path, models, message):
    (tmp_path / "models.toml").write_text(models)
    home = tmp_path / "home"
    home.mkdir()
    result = kvtier_service("install", "--platform", "linux", "--models-file", str(tmp_path / "models.toml"),
                            "--model-alias", "x=other", home=home)
    assert result.returncode == 2 and result.stderr.startswith("kvtier: ") and message in result.stderr
    assert result.stderr.count("\n") == 1 and files_under(home) == []


def test_uninstall_dry_run_linux_prints_commands_and_touches_nothing(tmp_path):
    result = kvtier_service("uninstall", "--dry-run", "--platform", "linux", home=tmp_path)
    assert result.returncode == 0, result.stderr
    unit_path = tmp_path / ".config" / "systemd" / "user" / "kvtier.service"
    assert_in_order(result.stdout, "systemctl --user disable --now kvtier.service", str(unit_path),
                    "systemctl --user daemon-reload")
    assert files_under(tmp_path) == []


def test_install_dry_run_darwin_prints_plist_and_launchctl_sequence(tmp_path):
    result = kvtier_service("install", "--dry-run", "--platform", "darwin", "--model", SOME_MODEL,
                            "--port", "8500", home=tmp_path)
    assert result.returncode == 0, result.stderr
    plist_path = tmp_path / "Library" / "LaunchAgents" / "com.kvtier.daemon.plist"
    xml = result.stdout[result.stdout.index("<?xml"):result.stdout.index("</plist>") + len("</plist>")]
    plist = plistlib.loads(xml.encode())
    assert plist["ProgramArguments"][-5:] == ["serve", "--model", SOME_MODEL, "--port", "8500"]
    uid = os.getuid()
    assert_in_order(result.stdout, str(plist_path), "<?xml",
                    f"launchctl bootout gui/{uid}/com.kvtier.daemon",
                    f"launchctl bootstrap gui/{uid} {plist_path}")
    assert files_under(tmp_path) == []

    result = kvtier_service("uninstall", "--dry-run", "--platform", "darwin", home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert_in_order(result.stdout, f"launchctl bootout gui/{uid}/com.kvtier.daemon", str(plist_path))
    assert files_under(tmp_path) == []


def test_status_dry_run_prints_the_status_command(tmp_path):
    linux = kvtier_service("status", "--dry-run", "--platform", "linux", home=tmp_path)
    darwin = kvtier_service("status", "--dry-run", "--platform", "darwin", home=tmp_path)
    assert linux.returncode == 0 and "systemctl --user status kvtier.service" in linux.stdout
    assert darwin.returncode == 0 and f"launchctl print gui/{os.getuid()}/com.kvtier.daemon" in darwin.stdout


def test_install_without_model_fails_clearly(tmp_path):
    result = kvtier_service("install", "--platform", "linux", home=tmp_path)
    assert result.returncode != 0
    assert "--model" in result.stderr and "required" in result.stderr
    assert files_under(tmp_path) == []


def test_missing_service_manager_is_a_clear_error_and_writes_nothing(tmp_path):
    empty = tmp_path / "empty-path"
    empty.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    result = kvtier_service("install", "--platform", "linux", "--model", SOME_MODEL, home=home,
                            PATH=str(empty))
    assert result.returncode != 0
    assert "systemctl not found" in result.stderr
    assert files_under(home) == []
    result = kvtier_service("status", "--platform", "darwin", home=home, PATH=str(empty))
    assert result.returncode != 0 and "launchctl not found" in result.stderr


def test_install_takes_every_serve_flag(tmp_path):
    """`service install` and `serve` share one declaration of the serve flags: any of them is
    written into the service's command line as given (sizes as typed)."""
    result = kvtier_service("install", "--dry-run", "--platform", "linux", "--model", SOME_MODEL,
                            "--ram-budget", "2GB", "--max-waiting", "8", "--strict-model-names",
                            "--model-alias", "a", "--model-alias", "b", home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ExecStart=" + shlex.join([sys.executable, "-m", "daemon.cli", "serve", "--model", SOME_MODEL,
                                      "--ram-budget", "2GB", "--max-waiting", "8", "--model-alias", "a",
                                      "--model-alias", "b", "--strict-model-names"]) in result.stdout


SECRET = "s3cret-Token_42"


@pytest.mark.parametrize("given", ["--api-key-file", "--api-key"])
def test_install_gives_the_service_its_key_in_a_private_file_never_its_command_line(tmp_path, given):
    key_file = tmp_path / "key"
    key_file.write_text(SECRET + "\n")
    home = tmp_path / "home"
    result = kvtier_service("install", "--dry-run", "--platform", "linux", "--model", SOME_MODEL,
                            given, str(key_file) if given == "--api-key-file" else SECRET, home=home)
    assert result.returncode == 0, result.stderr
    env_file = home / ".config" / "kvtier" / "service.env"
    unit_path = home / ".config" / "systemd" / "user" / "kvtier.service"
    assert_in_order(result.stdout, f"would write {env_file} (mode 600):", "KVTIER_API_KEY=(the API key, not shown)",
                    f"would write {unit_path} (mode 644):", f"EnvironmentFile={env_file}",
                    "ExecStart=" + shlex.join([sys.executable, "-m", "daemon.cli", "serve", "--model", SOME_MODEL]))
    assert SECRET not in result.stdout and "--api-key" not in result.stdout
    assert files_under(home) == []
    plan = service.install_plan(dataclasses.replace(make_spec("linux", home, model="m"), api_key=SECRET))
    assert service.Write(env_file, f"KVTIER_API_KEY={SECRET}\n", 0o600) in plan


def test_install_on_macos_puts_the_key_in_the_plist_written_0600(tmp_path):
    result = kvtier_service("install", "--dry-run", "--platform", "darwin", "--model", SOME_MODEL,
                            "--api-key", SECRET, home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout and "(mode 600):" in result.stdout
    xml = result.stdout[result.stdout.index("<?xml"):result.stdout.index("</plist>") + len("</plist>")]
    plist = plistlib.loads(xml.encode())
    assert plist["EnvironmentVariables"]["KVTIER_API_KEY"] == "(the API key, not shown)"
    assert "--api-key" not in plist["ProgramArguments"]


def test_a_key_file_is_written_private_even_over_a_readable_one(tmp_path):
    path = tmp_path / "service.env"
    path.write_text("old")
    path.chmod(0o644)
    service.apply(service.Write(path, f"KVTIER_API_KEY={SECRET}\n", 0o600), loaded=False)
    assert path.stat().st_mode & 0o777 == 0o600 and path.read_text() == f"KVTIER_API_KEY={SECRET}\n"


def test_an_unusable_key_is_refused_clearly(tmp_path):
    result = kvtier_service("install", "--dry-run", "--platform", "linux", "--model", "m",
                            "--api-key", "two words", home=tmp_path)
    assert result.returncode == 2 and "API key must be printable ASCII" in result.stderr
    missing = kvtier_service("install", "--dry-run", "--platform", "linux", "--model", "m",
                             "--api-key-file", str(tmp_path / "none"), home=tmp_path)
    assert missing.returncode == 2 and "cannot read the API key file" in missing.stderr


@pytest.mark.parametrize("json_output", [False, True])
def test_status_exits_3_when_not_running_and_says_why_the_manager_cannot_be_asked(tmp_path, json_output):
    """This machine's real systemctl: with no user bus (containers, CI) it cannot be asked;
    with one, the unit is not installed under this fresh HOME. Either way: not running, 3."""
    if shutil.which("systemctl") is None:
        pytest.skip("needs systemctl")
    args = ["status", "--platform", "linux", *(["--json"] if json_output else [])]
    result = kvtier_service(*args, home=tmp_path)
    assert result.returncode == 3, result.stderr
    if json_output:
        assert json.loads(result.stdout)["running"] is False
    if "bus" in result.stderr or '"error"' in result.stdout:
        assert result.stderr.startswith("kvtier: cannot ask the service manager") and \
            len(result.stderr.splitlines()) == 1 and "enable-linger" in result.stderr
    empty = tmp_path / "empty-path"
    empty.mkdir()
    missing = kvtier_service(*args, home=tmp_path, PATH=str(empty))
    assert missing.returncode == 3 and "systemctl not found" in missing.stderr
