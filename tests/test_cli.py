"""The real `kvtier` CLI as a subprocess against a real cache directory, with the daemon
running (its app served in the test process, or `kvtier serve` where its environment is tested)
and stopped."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, TEST_BLOCK_SIZE, Reference, agent_messages

MAX_TOKENS = 12
NO_PREFETCH = ("--prefetch", "0")  # after a restart, blocks stay on disk


def kvtier(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon.cli", *args], cwd=ROOT, input=input,
                          capture_output=True, text=True, timeout=600,
                          env=None if env is None else dict(os.environ, **env))


def kvtier_json(*args: str):
    result = kvtier(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def ask(daemon, messages):
    response = daemon.client().chat.completions.create(
        model=str(daemon.model), messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    return response.choices[0].message.content, response.usage


@pytest.fixture(scope="module")
def reference(tiny_model) -> Reference:
    """The commands are tested on caches of the tiny model: what they do with a cache does not
    depend on the model's size, and its prefills take milliseconds."""
    return Reference(tiny_model)


@pytest.fixture
def filled(app_factory, tiny_model):
    """The daemon's app (served in the test process) after two projects' prompts."""
    daemon = app_factory(tiny_model, *NO_PREFETCH)
    for project in ("alpha", "beta"):
        ask(daemon, agent_messages(project))
    daemon.get("/cache/stats")
    return daemon


def block_files(cache_dir):
    return [p for p in (cache_dir / "blocks").rglob("*.safetensors")]


def test_stats_and_ls_with_the_daemon_running(filled, app_factory, tiny_model):
    cache = str(filled.cache_dir)
    filled.stop()  # the shutdown flushes, as SIGTERM does, so everything is on disk; then serve it again
    filled = app_factory(tiny_model, *NO_PREFETCH, cache_dir=filled.cache_dir)
    stats = kvtier_json("stats", "--cache-dir", cache)
    (model,) = stats["models"].values()
    assert model["requests"] == 2 and model["misses"] >= 1 and model["blocks"] > 0
    assert model["tokens_computed"] > model["tokens_from_ram"] > 0  # beta reused only the template header
    assert stats["disk"]["entries"] == len(block_files(filled.cache_dir))
    prefixes = kvtier_json("ls", "--cache-dir", cache)
    assert len(prefixes) == 2
    assert all(p["tokens"] > TEST_BLOCK_SIZE and p["tier"] == "disk" for p in prefixes)
    assert any("alpha" in p["preview"] or "coding agent" in p["preview"] for p in prefixes)
    human = kvtier("ls", "--cache-dir", cache)
    assert human.returncode == 0 and prefixes[0]["key"][:16] in human.stdout


def test_verify_clean_damaged_and_fixed(filled, reference, app_factory, tiny_model):
    cache = str(filled.cache_dir)
    filled.stop()
    assert kvtier("verify", "--cache-dir", cache).returncode == 0
    victim = sorted(block_files(filled.cache_dir))[0]
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF
    victim.write_bytes(bytes(data))
    (filled.cache_dir / "blocks" / "ab").mkdir(exist_ok=True)
    orphan = filled.cache_dir / "blocks" / "ab" / ("ab" * 16 + ".safetensors")
    orphan.write_bytes(b"left over")
    import os
    os.utime(orphan, (0, 0))  # old enough not to be a write in flight

    report = kvtier("verify", "--cache-dir", cache, "--json")
    assert report.returncode == 1
    kinds = sorted(p["kind"] for p in json.loads(report.stdout)["problems"])
    assert kinds == ["damaged", "orphan_file"]
    assert kvtier("verify", "--fix", "--cache-dir", cache).returncode == 0
    assert kvtier("verify", "--cache-dir", cache).returncode == 0
    assert not victim.exists() and not orphan.exists()

    filled = app_factory(tiny_model, *NO_PREFETCH, cache_dir=filled.cache_dir)
    for project in ("alpha", "beta"):
        messages = agent_messages(project)
        assert ask(filled, messages)[0] == reference.chat(messages, MAX_TOKENS)


def test_commands_refuse_an_index_damaged_past_its_header_and_purge_removes_nothing(filled):
    """A damaged data page passes the checks at opening (meta pages, size): `ls` and `purge`
    meet it while reading, and then say so and exit 2 (as at opening), instead of listing
    what they could read or purging on a partial index; `verify --fix` then rebuilds it."""
    cache = str(filled.cache_dir)
    filled.stop()
    listed = len(kvtier_json("ls", "--cache-dir", cache))
    (fingerprint,) = kvtier_json("stats", "--cache-dir", cache)["models"]
    files = sorted(block_files(filled.cache_dir))
    data_file = filled.cache_dir / "index" / "data.mdb"
    data = bytearray(data_file.read_bytes())
    page = data.find(fingerprint.encode() + b'{"') // 4096  # the page of the model's record (its name)
    assert page >= 2  # past the two meta pages
    data[page * 4096:(page + 1) * 4096] = b"\xde\xad" * 2048
    data_file.write_bytes(bytes(data))

    for command in (["stats"], ["ls"], ["purge", "--to-size", "1"]):
        refused = kvtier(*command, "--cache-dir", cache)
        assert refused.returncode == 2 and "kvtier verify --fix" in refused.stderr, refused
        assert "Traceback" not in refused.stderr
    assert sorted(block_files(filled.cache_dir)) == files  # the purge removed nothing
    assert kvtier("verify", "--fix", "--cache-dir", cache).returncode == 0
    assert len(kvtier_json("ls", "--cache-dir", cache)) == listed > 0


@pytest.mark.parametrize("command", [("ls",), ("stats",)])
def test_output_to_a_reader_that_left_is_no_traceback(filled, command):
    """`kvtier ls | head`: the pipe's reader gone before the output is written (a closed read
    end here) was a BrokenPipeError traceback; now silent, with a shell's status for it."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "daemon.cli", *command, "--cache-dir", str(filled.cache_dir)],
                                cwd=ROOT, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=600)
    finally:
        os.close(write_end)
    assert result.stderr == "" and result.returncode == 141


def test_purge_filters(filled):
    cache = str(filled.cache_dir)
    filled.stop()
    disk = kvtier_json("stats", "--cache-dir", cache)["disk"]
    before, target = disk["entries"], disk["bytes"] // 2 + disk["index_bytes"]
    assert kvtier_json("purge", "--older-than", "1h", "--cache-dir", cache)["removed"] == 0
    unknown = kvtier("purge", "--model", "some-other-model", "--cache-dir", cache)
    assert unknown.returncode == 2 and "no cached model" in unknown.stderr
    shrunk = kvtier_json("purge", "--to-size", str(target), "--cache-dir", cache)
    assert 0 < shrunk["entries"] < before and shrunk["bytes"] + disk["index_bytes"] <= target
    by_model = kvtier_json("purge", "--model", filled.model.name, "--cache-dir", cache)
    assert by_model["entries"] == 0 and block_files(filled.cache_dir) == []
    bad = kvtier("purge", "--cache-dir", cache)
    assert bad.returncode == 2 and "needs --all" in bad.stderr


def test_pins_survive_eviction_and_purge(filled):
    cache = str(filled.cache_dir)
    filled.stop()
    prefixes = kvtier_json("ls", "--cache-dir", cache)
    keep = prefixes[-1]
    assert kvtier("pin", keep["key"][:10], "--cache-dir", cache).returncode == 0
    kvtier_json("purge", "--to-size", "0", "--cache-dir", cache)
    kvtier_json("purge", "--older-than", "0s", "--cache-dir", cache)
    left = kvtier_json("ls", "--cache-dir", cache)
    assert [p["key"] for p in left] == [keep["key"]] and left[0]["pinned"]
    assert kvtier("unpin", keep["key"][:10], "--cache-dir", cache).returncode == 0
    assert kvtier_json("purge", "--to-size", "0", "--cache-dir", cache)["entries"] == 0
    missing = kvtier("pin", "ffffffff", "--cache-dir", cache)
    assert missing.returncode == 2 and "no cached prefix" in missing.stderr


def test_warm_then_a_request_reuses_it(daemon_factory, tiny_model, reference, tmp_path):
    """Started as a user starts them, without OpenBLAS preloaded (this test process may have
    it): `warm` must run the model on the BLAS the daemon runs it on, whose entries it reuses."""
    cache_dir = tmp_path / "warm-cache"
    system = agent_messages("omega")[0]["content"]
    as_a_user_starts_it = {"LD_PRELOAD": ""}
    warmed = kvtier("warm", "--model", str(tiny_model), "-", "--pin", "--cache-dir", str(cache_dir),
                    "--block-size", str(TEST_BLOCK_SIZE), "--json", input=system, env=as_a_user_starts_it)
    assert warmed.returncode == 0, warmed.stderr
    assert "prefill [" in warmed.stderr and json.loads(warmed.stdout)["pinned_entries"] > 0
    daemon = daemon_factory(tiny_model, cache_dir=cache_dir, env=as_a_user_starts_it)
    messages = agent_messages("omega", question="Start working.")
    text, usage = ask(daemon, messages)
    assert text == reference.chat(messages, MAX_TOKENS)
    system_tokens = len(reference.tokenizer.apply_chat_template(messages[:1]))
    assert usage.prompt_tokens_details.cached_tokens >= system_tokens - 1
    assert usage.model_extra["kvtier"]["disk_tokens"] > 0


def test_warm_of_a_request_file_is_what_that_request_reuses(app_factory, tiny_model, tmp_path):
    """A recorded OpenAI request (a developer message, text parts, a tool call whose arguments
    are a JSON string) is warmed as the chat route renders it, so the request reuses all of it
    (it rendered another prompt: `developer` was warmed as a role of its own, reused 1 token)."""
    system = agent_messages("kappa")[0]["content"]
    messages = [{"role": "developer", "content": system},
                {"role": "user", "content": [{"type": "text", "text": "Read a.py."}]},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                    "name": "read_file", "arguments": '{"path": "a.py"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "print(1)"}]
    (tmp_path / "agent.json").write_text(json.dumps({"messages": messages}))
    cache_dir = tmp_path / "warm-cache"
    on_this_process_blas = {"KVTIER_NO_OPENBLAS": "1"}  # the app below runs in this process
    warmed = kvtier("warm", "--model", str(tiny_model), str(tmp_path / "agent.json"), "--cache-dir", str(cache_dir),
                    "--block-size", str(TEST_BLOCK_SIZE), "--json", env=on_this_process_blas)
    assert warmed.returncode == 0, warmed.stderr
    daemon = app_factory(tiny_model, *NO_PREFETCH, cache_dir=cache_dir)
    _, usage = ask(daemon, messages)
    assert usage.prompt_tokens == json.loads(warmed.stdout)["tokens"]
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1  # the last one is computed


@pytest.mark.parametrize("model, message", [("nonexistent", "no model directory at"),
                                            ("not-a-model", "is not a model: ")])
def test_warm_of_a_model_that_is_not_there_is_one_line(tmp_path, model, message):
    (tmp_path / "not-a-model").mkdir()  # a directory without config.json
    (tmp_path / "sys.txt").write_text("You are a helpful assistant.")
    cache_dir = tmp_path / "cache"
    result = kvtier("warm", "--model", str(tmp_path / model), "--cache-dir", str(cache_dir), str(tmp_path / "sys.txt"))
    assert result.returncode == 2 and result.stderr.startswith("kvtier: ") and message in result.stderr
    assert result.stderr.count("\n") == 1 and not cache_dir.exists()


@pytest.mark.parametrize("name, content, message", [
    ("agent.json", "not json {", "agent.json is not JSON (Expecting value"),
    ("agent.JSON", '{"prompt": "hi"}', 'agent.JSON has no "messages" list'),
    ("agent.json", '[{"role": "user", "content": "hi"}]', 'agent.json has no "messages" list'),
    ("agent.json", '{"messages": [{"role": "user"}], "tools": {"name": "x"}}',
     "agent.json: invalid 'tools': Input should be a valid list"),
    ("agent.json", '{"messages": [5]}', "agent.json: invalid 'messages[0]': Input should be a valid dictionary"),
    ("agent.json", '{"messages": []}', "agent.json: invalid 'messages': List should have at least 1 item"),
    ("agent.json", '{"messages": [{"role": "user", "content": "hi"}], "tools": [5]}',
     "agent.json: invalid 'tools[0]': Input should be a valid dictionary"),
    ("prompt.txt", "", "prompt.txt: invalid 'prompt': String should have at least 1 character")])
def test_warm_refuses_a_file_that_is_not_a_request(tmp_path, tiny_model, name, content, message):
    (tmp_path / name).write_text(content)
    cache_dir = tmp_path / "cache"
    result = kvtier("warm", "--model", str(tiny_model), "--cache-dir", str(cache_dir), str(tmp_path / name))
    assert result.returncode == 2 and result.stderr.startswith("kvtier: ") and message in result.stderr
    assert result.stderr.count("\n") == 1 and not cache_dir.exists()


@pytest.mark.parametrize("flags, content, message", [
    ((), b"\xff\xfe a system prompt", "prompt.txt is not UTF-8 text (byte 0: invalid start byte)"),
    (("--block-size", "8"), b"a system prompt", "block size must be between 16 and 8192 tokens"),
    (("--block-size", "0"), b"a system prompt", "block size must be between 16 and 8192 tokens"),  # not the default
    (("--kv-bits", "7"), b"a system prompt", "kv bits must be one of 2, 3, 4, 5, 6, 8")])
def test_warm_refuses_a_file_or_a_flag_it_cannot_use_in_one_line(tmp_path, tiny_model, flags, content, message):
    """Were tracebacks (UnicodeDecodeError, CacheConfig's ValueError), or `--block-size 0`
    warmed at the default size, which a daemon given 0 refuses."""
    (tmp_path / "prompt.txt").write_bytes(content)
    cache_dir = tmp_path / "cache"
    result = kvtier("warm", "--model", str(tiny_model), "--cache-dir", str(cache_dir), *flags, str(tmp_path / "prompt.txt"))
    assert result.returncode == 2 and result.stderr.startswith("kvtier: ") and message in result.stderr
    assert result.stderr.count("\n") == 1 and not cache_dir.exists()


def test_warm_takes_any_other_text_file_as_the_system_prompt(tmp_path, tiny_model):
    (tmp_path / "prompt.txt").write_text("not json { " * 40)
    result = kvtier("warm", "--model", str(tiny_model), "--cache-dir", str(tmp_path / "cache"),
                    "--block-size", str(TEST_BLOCK_SIZE), "--json", str(tmp_path / "prompt.txt"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tokens"] > 40


def test_version_is_the_packages():
    declared = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert declared is not None
    result = kvtier("--version")
    assert result.returncode == 0 and result.stdout == f"kvtier {declared.group(1)}\n"


def test_cli_errors_are_clear(tmp_path):
    result = kvtier("stats", "--cache-dir", str(tmp_path / "nothing"))
    assert result.returncode == 2 and "no kvtier cache" in result.stderr
    result = kvtier("purge", "--older-than", "soon", "--cache-dir", str(tmp_path))
    assert result.returncode == 2 and "not a duration" in result.stderr


@pytest.mark.parametrize("command, port, lowest", [("serve", "99999", 0), ("serve", "-1", 0),
                                                   ("open", "65536", 1), ("open", "0", 1)])
def test_a_port_out_of_range_is_refused(tmp_path, command, port, lowest):
    """Not taken modulo 65536 (99999 listened on 34463); serve's 0 is any free port."""
    browser = tmp_path / "browser"  # in case a port is taken: the open does nothing
    browser.write_text("#!/bin/sh\n")
    browser.chmod(0o755)
    model = ("--model", str(tmp_path / "none")) if command == "serve" else ()
    result = kvtier(command, "--port", port, *model, env={"BROWSER": str(browser)})
    assert result.returncode == 2 and result.stdout == ""
    assert f"argument --port: not a port number ({lowest}-65535): '{port}'" in result.stderr


@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_queue_that_holds_no_request_is_refused(tmp_path, value):
    """--max-waiting 0 or -1 started a daemon that answered every request 503, idle or not (a
    request is refused once --max-waiting wait: 0 >= 0); now refused as --max-tokens 0 is."""
    result = kvtier("serve", "--max-waiting", value, "--model", str(tmp_path / "none"))
    assert result.returncode == 2 and result.stdout == ""
    assert f"argument --max-waiting: not a positive whole number: '{value}'" in result.stderr


def test_hit_rate_is_weighted_by_tokens(app_factory, tiny_model):
    """A request that shares only the template's first tokens is a "hit" of a few tokens: the
    hit rate counts tokens, and such a request is not among those that reused half their prompt.
    The daemon's app is served in the test process; the CLI reads the cache it leaves."""
    daemon = app_factory(tiny_model)
    usages = [ask(daemon, agent_messages(project))[1] for project in ("alpha", "alpha", "omega")]
    cached = [u.prompt_tokens_details.cached_tokens for u in usages]
    prompt = [u.prompt_tokens for u in usages]
    assert cached[0] == 0 and cached[1] == prompt[1] - 1 and 0 < cached[2] < prompt[2] / 10
    live = daemon.get("/cache/stats")
    daemon.stop()
    stats = kvtier_json("stats", "--cache-dir", str(daemon.cache_dir))
    (model,) = stats["models"].values()
    for rates in (model, stats["overall"]):
        assert rates["requests"] == 3 and rates["hits"] == 2 and rates["half_cached"] == 1
        assert rates["hit_rate"] == round(sum(cached) / sum(prompt), 4)
    assert live["hit_rate"] == model["hit_rate"] and live["half_cached"] == 1
    human = kvtier("stats", "--cache-dir", str(daemon.cache_dir)).stdout
    assert f"hit rate {100 * model['hit_rate']:.0f}% of {sum(prompt)} prompt tokens" in human
    assert "1 of 3 requests reused at least half their prompt" in human


def test_cache_commands_do_not_load_the_model_stack():
    """stats, ls, purge and verify read the cache directory alone: importing what they use
    must not pull in mlx_lm and transformers (seconds of start-up for every command)."""
    code = ("import sys, daemon.cli, daemon.cli_cache, kvtier.ops, kvtier.local; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx_lm', 'transformers')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
