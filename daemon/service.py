"""`kvtier service install | uninstall | status`: run the daemon as a per-user service that
starts at login and comes back after a crash: a launchd LaunchAgent on macOS, a systemd user
unit on Linux.

The builders are pure functions of a `ServiceSpec`, so both formats can be generated and
tested on any platform; only `run_command` and `apply` touch the system."""

from __future__ import annotations

import argparse
import json
import os
import plistlib
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .model_config import configured_models, parse_model_flag
from .serve_options import add_serve_flags, serve_args

LABEL = "com.kvtier.daemon"
UNIT = "kvtier.service"
# Seconds the service manager waits between SIGTERM and SIGKILL: on SIGTERM kvtier writes
# every block not yet on disk, which takes a while with a large RAM tier.
STOP_TIMEOUT = 60
_BASE_PATH = {"darwin": "/opt/homebrew/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
              "linux": "/usr/local/bin:/usr/bin:/bin"}
_MISSING_TOOL = {
    "launchctl": "launchctl not found: LaunchAgents need macOS",
    "systemctl": "systemctl not found: `kvtier service` needs systemd on Linux; "
                 "run `kvtier serve` under another supervisor instead",
}
_NO_USER_MANAGER = "a user systemd instance needs a login session, or `loginctl enable-linger $USER`"


class ServiceError(Exception):
    """Reported as `kvtier: <message>`, exiting with `code`."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ServiceSpec:
    """Everything the service files depend on, passed explicitly so the builders stay pure."""

    platform: str  # "darwin" or "linux"
    home: Path
    uid: int
    python: str  # absolute path of the interpreter, as in the venv (symlink not resolved)
    serve_args: tuple[str, ...]
    working_dir: Path
    cache_dir: str | None = None
    config_home: Path | None = None  # $XDG_CONFIG_HOME, if set
    api_key: str | None = None  # given to the service in a 0600 file, never on its command line


@dataclass(frozen=True)
class Run:
    argv: tuple[str, ...]
    if_loaded: bool = False  # only when the service was already loaded/running before we began


@dataclass(frozen=True)
class MakeDir:
    path: Path


@dataclass(frozen=True)
class Write:
    path: Path
    content: str
    mode: int = 0o644  # 0o600 for a file that holds the API key


@dataclass(frozen=True)
class Remove:
    path: Path


Action = Run | MakeDir | Write | Remove


# ---- pure builders -------------------------------------------------------------------------

def normalize_platform(platform: str) -> str:
    if platform == "darwin":
        return "darwin"
    if platform.startswith("linux"):
        return "linux"
    raise ServiceError(f"services are supported on macOS (launchd) and Linux (systemd), not {platform}")


def program_arguments(spec: ServiceSpec) -> list[str]:
    return [spec.python, "-m", "daemon.cli", "serve", *spec.serve_args]


def environment(spec: ServiceSpec) -> dict[str, str]:
    # Services start with a bare PATH; put the venv first so tools it ships are found.
    env = {"PATH": f"{Path(spec.python).parent}:{_BASE_PATH[spec.platform]}"}
    if spec.cache_dir is not None:
        env["KVTIER_CACHE_DIR"] = spec.cache_dir
    return env


def key_file(spec: ServiceSpec) -> Path:
    """systemd: the unit's EnvironmentFile, 0600, holding KVTIER_API_KEY (a unit file is
    world-readable; `systemctl show` prints its Environment= lines to anyone)."""
    return (spec.config_home or spec.home / ".config") / "kvtier" / "service.env"


def check_api_key(key: str) -> str:
    if not key or not all(33 <= ord(c) < 127 and c not in "\\\"'$" for c in key):
        # what an environment file and a plist hold as written, unquoted and unexpanded
        raise ServiceError("the API key must be printable ASCII without spaces, quotes, backslashes or $", 2)
    return key


def log_dir(spec: ServiceSpec) -> Path:
    return spec.home / "Library" / "Logs" / "kvtier"


def service_path(spec: ServiceSpec) -> Path:
    if spec.platform == "darwin":
        return spec.home / "Library" / "LaunchAgents" / f"{LABEL}.plist"
    return (spec.config_home or spec.home / ".config") / "systemd" / "user" / UNIT


def launchd_plist(spec: ServiceSpec) -> dict:
    logs = log_dir(spec)
    return {
        "Label": LABEL,
        "ProgramArguments": program_arguments(spec),
        "RunAtLoad": True,
        "KeepAlive": True,
        "WorkingDirectory": str(spec.working_dir),
        # The key here too: install writes this file 0600 when it holds one.
        "EnvironmentVariables": environment(spec) | ({"KVTIER_API_KEY": spec.api_key} if spec.api_key else {}),
        "StandardOutPath": str(logs / "kvtier.out.log"),
        "StandardErrorPath": str(logs / "kvtier.err.log"),
        "ExitTimeOut": STOP_TIMEOUT,  # launchd's default (20 s) can cut the final flush short
    }


def _systemd_escape(text: str) -> str:
    # `%` starts a unit specifier everywhere in a unit file; a newline would end the setting.
    if "\n" in text:
        raise ServiceError(f"cannot write a newline into a systemd unit: {text!r}")
    return text.replace("%", "%%")


def _systemd_quoted(text: str) -> str:
    # systemd reads C escapes inside quotes, so backslashes and double quotes are escaped.
    return _systemd_escape('"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"')


def systemd_word(word: str) -> str:
    """One ExecStart word: shlex quoting, plus systemd's `%` specifiers and `$` variables."""
    if "'" in word or "\\" in word:
        # systemd accepts a quote only at the start of a word, so shlex's '"'"' splicing
        # would not parse: use one double-quoted word instead.
        return _systemd_quoted(word).replace("$", "$$")
    return _systemd_escape(shlex.quote(word)).replace("$", "$$")


def systemd_unit(spec: ServiceSpec) -> str:
    env_lines = [f"Environment={_systemd_quoted(f'{k}={v}')}" for k, v in environment(spec).items()]
    exec_start = " ".join(systemd_word(w) for w in program_arguments(spec))
    return "\n".join([
        "# Written by `kvtier service install`; run it again to change the options.",
        "[Unit]",
        "Description=kvtier KV-cache daemon",
        "After=network.target",
        "",
        "[Service]",
        "Type=simple",
        f"WorkingDirectory={_systemd_escape(str(spec.working_dir))}",
        *env_lines,
        *([f"EnvironmentFile={_systemd_escape(str(key_file(spec)))}"] if spec.api_key else []),
        f"ExecStart={exec_start}",
        "Restart=on-failure",  # a crash too: a SIGBUS from an index cut short under it
        "RestartSec=2",  # systemd's 100 ms would spend its 5 starts in 10 s on a crash loop
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={STOP_TIMEOUT}",
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ])


def service_file(spec: ServiceSpec) -> str:
    if spec.platform == "darwin":
        return plistlib.dumps(launchd_plist(spec)).decode()
    return systemd_unit(spec)


def _launchd_domain(spec: ServiceSpec) -> str:
    return f"gui/{spec.uid}"


def _systemctl(*args: str) -> tuple[str, ...]:
    return ("systemctl", "--user", *args)


def install_plan(spec: ServiceSpec) -> list[Action]:
    path = service_path(spec)
    if spec.platform == "darwin":
        target = f"{_launchd_domain(spec)}/{LABEL}"
        return [MakeDir(log_dir(spec)), Write(path, service_file(spec), 0o600 if spec.api_key else 0o644),
                Run(("launchctl", "bootout", target), if_loaded=True),
                Run(("launchctl", "bootstrap", _launchd_domain(spec), str(path)))]
    # A key not given again is removed: the service runs with the options of the last install.
    key = Write(key_file(spec), f"KVTIER_API_KEY={spec.api_key}\n", 0o600) if spec.api_key else Remove(key_file(spec))
    # `enable --now` leaves a running service on its old command line, hence the restart.
    return [key, Write(path, service_file(spec)), Run(_systemctl("daemon-reload")),
            Run(_systemctl("enable", "--now", UNIT)), Run(_systemctl("restart", UNIT), if_loaded=True)]


def uninstall_plan(spec: ServiceSpec) -> list[Action]:
    path = service_path(spec)
    if spec.platform == "darwin":
        return [Run(("launchctl", "bootout", f"{_launchd_domain(spec)}/{LABEL}"), if_loaded=True),
                Remove(path)]
    return [Run(_systemctl("disable", "--now", UNIT)), Remove(path), Remove(key_file(spec)),
            Run(_systemctl("daemon-reload"))]


def status_command(spec: ServiceSpec) -> tuple[str, ...]:
    if spec.platform == "darwin":
        return ("launchctl", "print", f"{_launchd_domain(spec)}/{LABEL}")
    return _systemctl("status", UNIT)


def describe(action: Action, spec: ServiceSpec) -> str:
    if isinstance(action, Run):
        note = ""
        if action.if_loaded:
            note = "   # only if already loaded" if spec.platform == "darwin" else "   # only if already running"
        return f"would run: {shlex.join(action.argv)}{note}"
    if isinstance(action, MakeDir):
        return f"would create directory: {action.path}"
    if isinstance(action, Write):
        content = action.content.rstrip()
        if spec.api_key:
            content = content.replace(spec.api_key, "(the API key, not shown)")
        return f"would write {action.path} (mode {action.mode:o}):\n{content}\n"
    return f"would remove: {action.path}"


# ---- the system ----------------------------------------------------------------------------

def run_command(argv: Sequence[str], *, check: bool = True,
                capture: bool = True) -> subprocess.CompletedProcess[str]:
    """The one place launchctl/systemctl run: a missing tool or a failure becomes ServiceError."""
    try:
        return subprocess.run(list(argv), check=check, text=True, capture_output=capture)
    except FileNotFoundError:
        raise ServiceError(_MISSING_TOOL.get(argv[0], f"{argv[0]} not found"), 127) from None
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or exc.stdout or "").strip()
        message = f"`{shlex.join(argv)}` failed (exit {exc.returncode})" + (f": {detail}" if detail else "")
        raise ServiceError(message, exc.returncode if exc.returncode > 0 else 1) from None


def is_loaded(spec: ServiceSpec) -> bool:
    """Whether the service is loaded (launchd) or active (systemd); also checks the tool works."""
    if spec.platform == "darwin":
        return run_command(status_command(spec), check=False).returncode == 0
    result = run_command(_systemctl("is-active", UNIT), check=False)
    if not result.stdout.strip():  # no state printed: systemctl itself failed (e.g. no user bus)
        raise ServiceError(f"`systemctl --user` is not usable: {result.stderr.strip()} ({_NO_USER_MANAGER})")
    return result.returncode == 0


def apply(action: Action, loaded: bool) -> None:
    if isinstance(action, Run):
        if loaded or not action.if_loaded:
            run_command(action.argv)
    elif isinstance(action, MakeDir):
        action.path.mkdir(parents=True, exist_ok=True)
    elif isinstance(action, Write):
        action.path.parent.mkdir(parents=True, exist_ok=True)
        # Created with its mode, and set again if it existed: a key is never readable by others.
        fd = os.open(action.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, action.mode)
        with os.fdopen(fd, "w") as file:
            os.fchmod(fd, action.mode)
            file.write(action.content)
    else:
        action.path.unlink(missing_ok=True)


def status_info(spec: ServiceSpec) -> dict:
    """Machine-readable status; `running` decides the exit code."""
    info: dict = {"platform": spec.platform, "name": LABEL if spec.platform == "darwin" else UNIT,
                  "path": str(service_path(spec)), "installed": service_path(spec).exists(),
                  "loaded": False, "running": False, "state": None, "pid": None}
    if spec.platform == "darwin":
        result = run_command(status_command(spec), check=False)
        state = re.search(r"^\s*state = (\S+)", result.stdout, re.M)
        pid = re.search(r"^\s*pid = (\d+)", result.stdout, re.M)
        info.update(loaded=result.returncode == 0, state=state and state.group(1),
                    pid=pid and int(pid.group(1)))
        info["running"] = info["state"] == "running"
        return info
    props = "LoadState,ActiveState,SubState,MainPID,UnitFileState"
    result = run_command(_systemctl("show", UNIT, f"--property={props}"), check=False)
    if result.returncode != 0:
        error = " ".join(result.stderr.split()) or f"systemctl exited with {result.returncode}"
        info["error"] = f"{error} ({_NO_USER_MANAGER})" if "bus" in error else error
        return info
    shown = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    info.update(loaded=shown.get("LoadState") == "loaded", running=shown.get("ActiveState") == "active",
                state=f"{shown.get('ActiveState')}/{shown.get('SubState')}",
                pid=int(shown["MainPID"]) if shown.get("MainPID", "0") != "0" else None,
                enabled=shown.get("UnitFileState") == "enabled")
    return info


# ---- the command ---------------------------------------------------------------------------

def add_parser(commands: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dry-run", action="store_true",
                        help="print the file and the commands, change nothing")
    common.add_argument("--platform", default=sys.platform, help=argparse.SUPPRESS)  # for tests

    service = commands.add_parser("service", help="run the daemon as a login service (launchd/systemd)")
    actions = service.add_subparsers(dest="action", required=True)
    install = actions.add_parser("install", parents=[common], help="install and start the service")
    add_serve_flags(install, for_service=True)
    key = install.add_mutually_exclusive_group()
    key.add_argument("--api-key-file", metavar="PATH",
                     help="a file holding the bearer token the service requires (kept off any "
                          "command line: written to a 0600 environment file / the 0600 plist)")
    key.add_argument("--api-key", help="the token itself (visible in `ps` while install runs: "
                                       "prefer --api-key-file)")
    actions.add_parser("uninstall", parents=[common], help="stop the service and remove it")
    status = actions.add_parser("status", parents=[common], help="whether the service is running")
    status.add_argument("--json", action="store_true", help="machine-readable output")


def spec_from_args(args: argparse.Namespace) -> ServiceSpec:
    options = vars(args).copy()
    api_key = _api_key(options.pop("api_key", None), options.pop("api_key_file", None))
    if args.action == "install" and not options.get("model") and not options.get("models_file"):
        raise ServiceError("--model or --models-file is required: the models the service serves", 2)
    # The service starts in another directory: make paths absolute. A model that is not a
    # path is a repo id in the HF cache and stays as given.
    options["model"] = [absolute_model(text) for text in options.get("model", [])]
    if options.get("models_file") is not None:
        options["models_file"] = str(Path(options["models_file"]).expanduser().resolve())
    if args.action == "install":
        _check_models(options)
    if options.get("cache_dir") is not None:
        options["cache_dir"] = str(Path(options["cache_dir"]).expanduser().resolve())
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return ServiceSpec(
        platform=normalize_platform(args.platform),
        home=Path.home(),
        uid=os.getuid(),
        python=os.path.abspath(sys.executable),  # not resolved: the venv's symlink selects the venv
        serve_args=serve_args(options),
        working_dir=Path(__file__).resolve().parent.parent,  # where `-m daemon.cli` imports from source
        cache_dir=options.get("cache_dir"),
        config_home=Path(xdg) if xdg and os.path.isabs(xdg) else None,
        api_key=api_key,
    )


def absolute_model(text: str) -> str:
    """A `--model [NAME=]SOURCE` with SOURCE made absolute where it is a path: against this
    directory, not the service's. A path that is not there is refused now, not by a service
    restarting in a loop; anything else is a repo id and stays as given."""
    spec = parse_model_flag(text)
    source = Path(spec.source).expanduser()
    if not source.exists():
        if spec.source.startswith((".", "/", "~")):
            raise ServiceError(f"--model {text}: no model directory at {os.path.abspath(source)!r}", 2)
        return text
    named = spec.name != spec.source
    return f"{spec.name}={source.resolve()}" if named else str(source.resolve())


def _check_models(options: dict) -> None:
    """A models file's mistakes are said now, not by a service restarting in a loop."""
    try:
        configured_models(options["model"], options.get("models_file"), options.get("model_alias"))
    except ValueError as exc:
        raise ServiceError(str(exc), 2) from None


def _api_key(given: str | None, file: str | None) -> str | None:
    if file is not None:
        try:
            given = Path(file).expanduser().read_text().strip()
        except OSError as exc:
            raise ServiceError(f"cannot read the API key file {file}: {exc.strerror}", 2) from None
    return None if given is None else check_api_key(given)


def _execute(plan: list[Action], spec: ServiceSpec, dry_run: bool) -> None:
    if dry_run:
        for action in plan:
            print(describe(action, spec))
        return
    loaded = is_loaded(spec)  # also fails early, before any file is written, if the tool is unusable
    for action in plan:
        apply(action, loaded)


def _install(spec: ServiceSpec, dry_run: bool) -> int:
    _execute(install_plan(spec), spec, dry_run)
    if not dry_run:
        print(f"kvtier service installed and started: {service_path(spec)}")
        if spec.platform == "darwin":
            print(f"logs: {log_dir(spec)}/")
        else:
            print(f"logs: journalctl --user -u {UNIT} -f\n"
                  "to keep it running after logout: loginctl enable-linger $USER")
    return 0


def _uninstall(spec: ServiceSpec, dry_run: bool) -> int:
    path = service_path(spec)
    if not dry_run and not path.exists() and not (spec.platform == "darwin" and is_loaded(spec)):
        print(f"kvtier: no service installed ({path} not found)")
        return 0
    _execute(uninstall_plan(spec), spec, dry_run)
    if not dry_run:
        print(f"kvtier service stopped and removed: {path}")
    return 0


def _status(spec: ServiceSpec, dry_run: bool, as_json: bool) -> int:
    """Exit 0 running, 3 not running (as systemctl's is-active): also where the service
    manager cannot be asked (no user bus, no systemctl), which is then said on stderr."""
    if dry_run:
        print(f"would run: {shlex.join(status_command(spec))}")
        return 0
    try:
        info = status_info(spec)
    except ServiceError as exc:  # the tool is missing
        info = {"running": False, "error": str(exc)}
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        path = service_path(spec)
        print(f"service file: {path}" + ("" if path.exists() else " (not installed)"), flush=True)
        if "error" not in info:  # the manager's own account, for people
            run_command(status_command(spec), check=False, capture=False)
    if "error" in info:
        print(f"kvtier: cannot ask the service manager, so the service is not running under it: "
              f"{info['error']}", file=sys.stderr)
    return 0 if info["running"] else 3


def run(args: argparse.Namespace) -> int:
    try:
        spec = spec_from_args(args)
        if args.action == "install":
            return _install(spec, args.dry_run)
        if args.action == "uninstall":
            return _uninstall(spec, args.dry_run)
        return _status(spec, args.dry_run, args.json)
    except ServiceError as exc:
        print(f"kvtier: {exc}", file=sys.stderr)
        return exc.code
