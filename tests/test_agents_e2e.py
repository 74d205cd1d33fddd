"""Real agent CLIs from npm, unmodified, against a real daemon (`make e2e`): Claude Code
(`claude -p`, only ANTHROPIC_BASE_URL and a key set) and Codex (`codex exec`, a provider with
`wire_api = "responses"` in its config). Each skips only where npm cannot install it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import model_variant

pytestmark = pytest.mark.e2e
CLAUDE_CODE = f"@anthropic-ai/claude-code@{os.environ.get('KVTIER_CLAUDE_CODE_VERSION', 'latest')}"
CODEX = f"@openai/codex@{os.environ.get('KVTIER_CODEX_VERSION', 'latest')}"


def npx(package: str) -> list[str]:
    """The command that runs an npm package's CLI (npx installs it into its cache once)."""
    if shutil.which("npx") is None:
        pytest.skip(f"npx not found: install Node.js and npm to run {package}")
    command = ["npx", "--yes", package]
    try:
        found = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip(f"npm could not install {package} within 10 minutes")
    if found.returncode != 0:
        pytest.skip(f"npm could not install {package}: {found.stderr.strip()[-500:]}")
    return command


@pytest.fixture(scope="module")
def claude() -> list[str]:
    return npx(CLAUDE_CODE)


@pytest.fixture(scope="module")
def codex() -> list[str]:
    return npx(CODEX)


@pytest.fixture(scope="module")
def terse_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model (enough context for Claude Code's ~19K-token prompt, prefilled in
    seconds) with half its vocabulary as end-of-turn tokens, so that its random answers end
    with `end_turn` after a token or two instead of hitting Claude Code's output limit."""
    def half_the_vocabulary_ends_a_turn(config: dict) -> None:
        config["eos_token_id"] = list(range(0, config["vocab_size"], 2))

    return model_variant(tiny_model, tmp_path_factory.mktemp("terse") / "model", "config.json",
                         half_the_vocabulary_ends_a_turn)


def ask_claude(claude: list[str], daemon, home: Path, project: Path, question: str) -> dict:
    env = {"PATH": os.environ["PATH"], "HOME": str(home),
           "ANTHROPIC_BASE_URL": daemon.url, "ANTHROPIC_API_KEY": "sk-local",
           "CLAUDE_CODE_MAX_OUTPUT_TOKENS": "64"}  # Claude Code's own limit on answers
    result = subprocess.run([*claude, "-p", question, "--output-format", "json"], cwd=project,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-2000:])
    return json.loads(result.stdout)


def test_claude_code_runs_and_a_new_conversation_is_served_from_the_cache(
        claude, daemon_factory, terse_model, tmp_path):
    daemon = daemon_factory(terse_model)
    home, project = tmp_path / "home", tmp_path / "project"
    home.mkdir()
    project.mkdir()
    first = ask_claude(claude, daemon, home, project, "Say hello.")
    assert first["is_error"] is False and first["usage"]["cache_read_input_tokens"] == 0
    second = ask_claude(claude, daemon, home, project, "What is 2+2?")
    usage = second["usage"]  # as Claude Code itself counts it, over its requests
    assert second["is_error"] is False
    assert usage["cache_read_input_tokens"] > 0.6 * (usage["input_tokens"] + usage["cache_read_input_tokens"])
    log = daemon.log.read_text()
    assert "Traceback" not in log and " ERROR " not in log


CODEX_CONFIG = """model = "local"
model_provider = "kvtier"
model_catalog_json = "{catalog}"

[model_providers.kvtier]
name = "kvtier"
base_url = "{url}/v1"
wire_api = "responses"
env_key = "KVTIER_API_KEY"
"""


def codex_catalog(context_window: int) -> dict:
    """docs/api.md's model catalog: Codex's metadata for "local" (without it Codex warns that
    it runs on fallback metadata, and assumes a context window the model does not have)."""
    return {"models": [{
        "slug": "local", "display_name": "local (kvtier)", "context_window": context_window,
        "base_instructions": "You are Codex, a coding agent working in the user's terminal and "
                             "workspace. Be precise, safe and helpful.",
        "supported_reasoning_levels": [], "shell_type": "unified_exec", "visibility": "list",
        "supported_in_api": True, "priority": 0, "support_verbosity": False,
        "truncation_policy": {"mode": "tokens", "limit": 10000}, "experimental_supported_tools": []}]}


def ask_codex(codex: list[str], daemon, home: Path, project: Path, question: str) -> dict:
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "KVTIER_API_KEY": "sk-local"}
    result = subprocess.run([*codex, "exec", "--skip-git-repo-check", "--json", question],
                            cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-2000:])
    assert "Model metadata" not in result.stdout + result.stderr  # "... not found. Defaulting to fallback"
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    (done,) = [e for e in events if e["type"] == "turn.completed"]
    return done["usage"]


def test_codex_runs_on_the_responses_api_and_a_new_conversation_is_served_from_the_cache(
        codex, daemon_factory, terse_model, tmp_path):
    # No --max-tokens ceiling: Codex asks no output limit, and an answer must not be cut at one.
    daemon = daemon_factory(terse_model, ceiling=None)
    home, project = tmp_path / "home", tmp_path / "project"
    (home / ".codex").mkdir(parents=True)
    catalog = home / ".codex" / "kvtier-model.json"
    context = json.loads((terse_model / "config.json").read_text())["max_position_embeddings"]
    catalog.write_text(json.dumps(codex_catalog(context)))
    (home / ".codex" / "config.toml").write_text(CODEX_CONFIG.format(url=daemon.url, catalog=catalog))
    project.mkdir()
    first = ask_codex(codex, daemon, home, project, "Say hello.")
    assert first["cached_input_tokens"] == 0
    second = ask_codex(codex, daemon, home, project, "What is 2+2?")  # as Codex counts it
    assert second["cached_input_tokens"] > 0.9 * second["input_tokens"]
    log = daemon.log.read_text()
    assert "Traceback" not in log and " ERROR " not in log
