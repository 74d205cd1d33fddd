"""The docs against the code: every `kvtier serve` option is in README's synopsis, with its
real default where it shows a value, and has help text; the defaults the docs state in
prose are the real ones; every docs file the docs and Makefile cite exists."""

from __future__ import annotations

import argparse
import re

import pytest

from daemon.cli import build_parser
from tests.conftest import ROOT

README = ROOT / "README.md"
PROSE = [README, ROOT / "docs" / "operations.md"]  # where the serve options are described


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


def _serve_options() -> list[argparse.Action]:
    """The documented options: hidden ones (help=SUPPRESS, kept so old services start) are not."""
    return [a for a in _subcommands()["serve"]._actions
            if a.option_strings and a.dest != "help" and a.help != argparse.SUPPRESS]


def _synopsis() -> str:
    """README's `kvtier serve ...` block."""
    match = re.search(r"```sh\n(kvtier serve --model.*?)```", README.read_text(), re.S)
    assert match, "README has no `kvtier serve` synopsis"
    return match.group(1)


def _is_placeholder(shown: str) -> bool:
    """SIZE, N, PATH_OR_REPO: a name for the value, not a value."""
    return re.fullmatch(r"[A-Z][A-Z_\[\]=|]*", shown) is not None


def _real_default(action: argparse.Action):
    """argparse's default; None for one filled in at start-up (the machine's memory, the
    model's config): the synopsis then shows a placeholder, as no one value is true."""
    return action.default


def _converted(action: argparse.Action, text: str):
    convert = action.type if callable(action.type) else str
    try:
        return convert(text.replace(" ", ""))
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        return None


def _same_value(action: argparse.Action, shown: str) -> bool:
    real = _real_default(action)
    return real is not None and _converted(action, shown) == real


@pytest.mark.parametrize("action", _serve_options(), ids=lambda a: a.option_strings[0])
def test_every_serve_option_is_in_the_readme_with_its_real_default(action):
    flag = action.option_strings[0]
    synopsis = _synopsis()
    found = re.search(rf"\[?{re.escape(flag)}(?:\s+([^\s\]]+))?\]?", synopsis)
    assert found and re.search(rf"{re.escape(flag)}(?![\w-])", synopsis), f"{flag} is missing from README's synopsis"
    shown = found.group(1)
    if action.nargs == 0:  # a switch: nothing to show
        return
    assert shown is not None, f"{flag} shows no value in README's synopsis"
    assert _is_placeholder(shown) or _same_value(action, shown), (
        f"README's synopsis shows {flag} {shown}, but its default is {action.default!r} "
        f"(show the default, or a placeholder such as SIZE or N)")


@pytest.mark.parametrize("action", _serve_options(), ids=lambda a: a.option_strings[0])
def test_every_serve_option_has_help_text(action):
    assert action.help and action.help != argparse.SUPPRESS and len(action.help) > 10, \
        f"{action.option_strings[0]} has no help text"


@pytest.mark.parametrize("action", _serve_options(), ids=lambda a: a.option_strings[0])
def test_the_defaults_the_docs_state_are_the_real_ones(action):
    """`--flag` (default X) / `--flag`: ... Default X / `--flag X` shown as the default."""
    flag = action.option_strings[0]
    for path in PROSE:
        text = path.read_text()
        for match in re.finditer(rf"`{re.escape(flag)}`[^`\n]{{0,3}}\(?[Dd]efault:? ([\d.]+(?: ?[KMGT]i?B)?)", text):
            stated = match.group(1)
            if _real_default(action) is not None:
                assert _same_value(action, stated), \
                    f"{path.name} says {flag} defaults to {stated}; it is {_real_default(action)!r}"


def test_subcommands_have_help_of_their_own():
    """Each subcommand's one line says what it does (unpin's said it protects from eviction)."""
    helps = {}
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
    assert all(helps.values()) and len(set(helps.values())) == len(helps), helps
    assert "protect" not in (helps["unpin"] or "")


def test_every_docs_file_cited_exists():
    cited = set()
    for path in [README, ROOT / "Makefile", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        cited |= {(path, m) for m in re.findall(r"\bdocs/[\w/.-]+\.md\b", text)}
        if path.suffix == ".md":  # relative links, from the file's own directory
            cited |= {(path, str(path.parent.relative_to(ROOT) / m))
                      for m in re.findall(r"\]\(([\w/.-]+\.md)(?:#[\w-]*)?\)", text)}
    missing = sorted(f"{path.name}: {target}" for path, target in cited if not (ROOT / target).exists())
    assert not missing, missing


def test_make_test_prints_why_tests_were_skipped():
    """A plain `make test` skips tests (no ../shared/specs, redis-server, root): it must say why."""
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M)
    addopts = re.search(r"addopts\s*=\s*(.*)", (ROOT / "pyproject.toml").read_text())
    flags = (recipe.group(1) if recipe else "") + (addopts.group(1) if addopts else "")
    assert re.search(r"-r\w*[sa]", flags), "pytest's summary needs -rs (skip reasons)"
