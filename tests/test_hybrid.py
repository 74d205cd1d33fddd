"""Every architecture the project generates, through the daemon's app (served in the test
process, tests/inprocess.py; a restart is a new app on the same cache directory): reuse is
exact for KV, recurrent (SSM / linear attention) and sliding-window layers alike."""

from __future__ import annotations

import pytest

from tests.conftest import MODELS, Reference, agent_messages
from tests.support.blocks import decoded
from tests.support.testmodels import ARCHES, make_model

MAX_TOKENS = 16
NO_PREFETCH = ("--prefetch", "0")  # after a restart, blocks come from disk


@pytest.fixture(scope="module", params=ARCHES)
def arch_model(request):
    return make_model(MODELS / request.param, request.param)


@pytest.fixture(scope="module")
def arch_reference(arch_model) -> Reference:
    return Reference(arch_model)


def ask(daemon, messages):
    response = daemon.client().chat.completions.create(
        model=str(daemon.model), messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    return response.choices[0].message.content, response.usage.model_dump()


def test_three_requests_warm_and_cold(app_factory, arch_model, arch_reference):
    daemon = app_factory(arch_model)
    a = agent_messages("alpha", question="List the files.")
    b = agent_messages("alpha", question="Now run the tests and report.")
    c = [dict(a[0], content="Z" + a[0]["content"][1:]), b[1]]
    outputs = []
    for name, messages in (("A", a), ("B", b), ("C", c)):
        text, usage = ask(daemon, messages)
        assert text == arch_reference.chat(messages, MAX_TOKENS), name
        outputs.append(text)
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        if name == "A":
            assert cached == 0
        elif name == "B":  # shares the system prompt: reused up to its end at least
            system_end = len(arch_reference.tokenizer.apply_chat_template(a[:1]))
            assert cached >= system_end - 1 > 0
        else:  # changed in its first character: only the template header can match
            assert cached < 8
    assert len(set(outputs)) > 1  # the model's output depends on its context


def test_multi_turn_with_restart_between_turns(app_factory, arch_model, arch_reference):
    daemon = app_factory(arch_model, *NO_PREFETCH)
    messages = agent_messages("beta", question="Open the main module.")
    for turn in range(4):
        if turn == 2:
            daemon.stop()  # flushes every hot block, as SIGTERM does
            daemon = app_factory(arch_model, *NO_PREFETCH, cache_dir=daemon.cache_dir)
        text, usage = ask(daemon, messages)
        assert text == arch_reference.chat(messages, MAX_TOKENS), f"turn {turn}"
        if turn:
            kv = usage["kvtier"]
            assert usage["prompt_tokens_details"]["cached_tokens"] > 0, f"turn {turn}"
            if turn == 2:
                assert kv["disk_tokens"] > 0 and kv["ram_tokens"] == 0
        messages = messages + [{"role": "assistant", "content": text},
                               {"role": "user", "content": f"Tool result {turn}: ok. Continue."}]
    assert daemon.get("/cache/stats")["tokenizer"]["tokens_reused"] > 0  # turn 3 tokenized only its new messages


def test_partly_evicted_chain_falls_back_and_stays_exact(app_factory, arch_model, arch_reference):
    from kvtier.disk import BlockFiles
    from kvtier.index import Index

    daemon = app_factory(arch_model, *NO_PREFETCH)
    first = agent_messages("gamma", question="Summarise the README.")
    ask(daemon, first)
    daemon.stop()
    # Evict the most recently written half of the entries, as a full disk tier would.
    index = Index(daemon.cache_dir / "index")
    files = BlockFiles(daemon.cache_dir / "blocks")
    keys = sorted(decoded(index.items()).items(), key=lambda kv: (kv[1].created_ms, kv[1].depth))
    for key, _ in keys[len(keys) // 2 :]:
        index.remove(key)
        files.remove(key.hex())
    index.close()
    daemon = app_factory(arch_model, *NO_PREFETCH, cache_dir=daemon.cache_dir)
    second = agent_messages("gamma", question="Now fix the failing test.")
    text, usage = ask(daemon, second)
    assert text == arch_reference.chat(second, MAX_TOKENS)


def test_message_ends_from_one_tokenization_equal_retokenizing_each_prefix(arch_model, tmp_path):
    """Snapshot points come from one tokenization with offsets; they must be exactly where
    the system prompt and the last messages end when each prefix is tokenized on its own."""
    from kvtier.config import CacheConfig
    from kvtier.engine import Engine

    engine = Engine(str(arch_model), CacheConfig(cache_dir=tmp_path, block_size=64))
    try:
        assert engine.plan is not None
        if not engine.plan.needs_snapshots:
            pytest.skip("no snapshot layers in this architecture")
        assert engine.renderer.incremental is not None  # prompts tokenized incrementally (kvtier.tokcache)
        conversation = agent_messages("delta", question="Run  the tests,\n\nthen  report. ") + [
            {"role": "assistant", "content": "Running them now.  "},
            {"role": "tool", "content": "FAILED test_total - assert 41 == 42\n\n"},
            {"role": "user", "content": "Why? Übersicht, bitte."}]
        shell_tools = [{"type": "function", "function": {
            "name": "run_shell", "description": "Run a command in the project root.",
            "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]}}}]
        for messages, tools in ((conversation, None), (conversation, shell_tools), (conversation[:2], None)):
            tokens = engine.renderer.chat_tokens(messages, tools)
            assert tokens == list(engine.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True))
            text = engine.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                        tokenize=False)
            assert engine.renderer.token_ends(text, tokens) is not None  # the one-tokenization path is taken
            expected = set()
            for count in {1, *range(max(1, len(messages) - 3), len(messages) + 1)}:
                partial = engine.tokenizer.apply_chat_template(messages[:count], tools=tools)
                shared = next((i for i, (a, b) in enumerate(zip(partial, tokens)) if a != b),
                              min(len(partial), len(tokens)))
                expected.add(shared)
            assert engine.renderer.message_boundaries(messages, tools, tokens) == sorted(expected - {0})
    finally:
        engine.close()
