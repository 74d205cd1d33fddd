"""End to end through the daemon's app (served in the test process, tests/inprocess.py; a
`kvtier serve` process where a kill -9 is tested): every cached answer equals plain mlx-lm, and
usage reports where the prompt came from (RAM, disk, computed)."""

from __future__ import annotations

import signal

import pytest

from tests.conftest import TEST_BLOCK_SIZE, agent_messages
from tests.support.blocks import decoded

MAX_TOKENS = 24
NO_PREFETCH = ("--prefetch", "0")  # after a restart, blocks come from disk


@pytest.fixture
def app(app_factory, llama_model):
    """A fresh app with an empty cache for each test."""
    return app_factory(llama_model, *NO_PREFETCH)


def ask(daemon, messages, max_tokens=MAX_TOKENS):
    response = daemon.client().chat.completions.create(
        model=str(daemon.model), messages=messages, max_tokens=max_tokens, temperature=0)
    usage = response.usage.model_dump()
    return response.choices[0].message.content, usage


def test_context_changes_output(reference):
    """Guard for every test below: the model's greedy output depends on its context,
    so reusing a wrong prefix would show up as different text."""
    a = reference.chat(agent_messages("alpha"), MAX_TOKENS)
    b = reference.chat(agent_messages("omega"), MAX_TOKENS)
    c = reference.chat(agent_messages("alpha", question="Run the tests."), MAX_TOKENS)
    assert len({a, b, c}) == 3


def test_fresh_then_ram_hit(app, reference):
    messages = agent_messages()
    expected = reference.chat(messages, MAX_TOKENS)
    prompt_len = len(reference.chat_tokens(messages))

    text, usage = ask(app, messages)
    assert text == expected
    assert usage["prompt_tokens"] == prompt_len
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert usage["kvtier"]["computed_tokens"] == prompt_len

    text, usage = ask(app, messages)
    assert text == expected
    # Everything but the last prompt token, whose logits must be fresh; the tail of the
    # last, partly filled block comes from the block that also holds the first answer.
    assert usage["kvtier"]["ram_tokens"] == prompt_len - 1
    assert usage["prompt_tokens_details"]["cached_tokens"] == prompt_len - 1
    assert usage["kvtier"]["computed_tokens"] == 1


def test_disk_hit_after_restart(app_factory, app, llama_model, reference):
    messages = agent_messages(question="Which tests are failing?")
    expected = reference.chat(messages, MAX_TOKENS)
    assert ask(app, messages)[0] == expected

    app.stop()  # flushes every hot block, as SIGTERM does
    daemon = app_factory(llama_model, *NO_PREFETCH, cache_dir=app.cache_dir)
    stats = daemon.get("/cache/stats")
    assert stats["ram"]["blocks"] == 0 and stats["disk"]["blocks"] > 0

    text, usage = ask(daemon, messages)
    assert text == expected
    assert usage["kvtier"]["disk_tokens"] > 0 and usage["kvtier"]["ram_tokens"] == 0
    # Restored blocks are hot now, cut back out of the cache they were restored into.
    text, hot = ask(daemon, messages)
    assert text == expected and hot["kvtier"]["ram_tokens"] == usage["kvtier"]["disk_tokens"]


def test_partial_prefix_hit(app, reference):
    first = agent_messages(question="Summarise the README.")
    ask(app, first)
    second = agent_messages(question="Now fix the failing test in tests/test_io.py, then run it.")
    expected = reference.chat(second, MAX_TOKENS)
    text, usage = ask(app, second)
    assert text == expected
    shared = _common_prefix(reference.chat_tokens(first), reference.chat_tokens(second))
    assert shared > 2 * TEST_BLOCK_SIZE
    assert usage["prompt_tokens_details"]["cached_tokens"] == shared
    assert usage["kvtier"]["computed_tokens"] == len(reference.chat_tokens(second)) - shared


def test_changed_first_character_reuses_only_the_template_header(app, reference):
    messages = agent_messages()
    ask(app, messages)
    changed = [dict(messages[0], content="Z" + messages[0]["content"][1:]), messages[1]]
    header = _common_prefix(reference.chat_tokens(messages), reference.chat_tokens(changed))
    assert header < 8  # just the chat template's fixed `<|im_start|>system` tokens
    expected = reference.chat(changed, MAX_TOKENS)
    text, usage = ask(app, changed)
    assert text == expected
    assert usage["prompt_tokens_details"]["cached_tokens"] == header


def test_changed_first_token_is_a_full_miss(app, reference):
    prompt = "import os\nimport sys\n" + "def handler(event):\n    return event\n" * 40
    client = app.client()
    client.completions.create(model=str(app.model), prompt=prompt, max_tokens=8, temperature=0)
    changed = "from os import path\n" + prompt[len("import os\n"):]
    tokens = list(reference.tokenizer.encode(changed))
    assert tokens[0] != reference.tokenizer.encode(prompt)[0]
    response = client.completions.create(model=str(app.model), prompt=changed, max_tokens=MAX_TOKENS,
                                         temperature=0)
    assert response.choices[0].text == reference.generate(tokens, MAX_TOKENS)
    assert response.usage.prompt_tokens_details.cached_tokens == 0


def test_multi_turn_conversation_reuses_every_turn(app, reference):
    """The cache's blocks, and the tokenizer's: later turns tokenize only their new messages
    (kvtier.tokcache), and the answers are still plain mlx-lm's."""
    messages = agent_messages(question="Open the main module.")
    for turn in range(3):
        expected = reference.chat(messages, MAX_TOKENS)
        text, usage = ask(app, messages)
        assert text == expected
        if turn:
            assert usage["prompt_tokens_details"]["cached_tokens"] > 0
        messages = messages + [{"role": "assistant", "content": text},
                               {"role": "user", "content": f"Good. Step {turn + 2}: keep going."}]
    tokenizer = app.get("/cache/stats")["tokenizer"]
    assert tokenizer["incremental"] and tokenizer["tokens_reused"] > tokenizer["tokens_tokenized"] > 0


def test_sigkill_loses_nothing_flushed_and_corrupts_nothing(daemon, reference):
    messages = agent_messages(question="What does the config module do?")
    expected = reference.chat(messages, MAX_TOKENS)
    assert ask(daemon, messages)[0] == expected
    daemon.stop(signal.SIGKILL)
    daemon.start()
    text, usage = ask(daemon, messages)
    assert text == expected


def test_index_and_files_agree(app):
    for project in ("alpha", "beta"):
        ask(app, agent_messages(project))
    app.stop()  # the shutdown flushes every hot block, as SIGTERM does
    from kvtier.disk import BlockFiles, key_of_path
    from kvtier.index import Index

    index = Index(app.cache_dir / "index")
    records = decoded(index.items())
    files = {key_of_path(p): p for p in BlockFiles(app.cache_dir / "blocks").iter_files()}
    assert set(files) == {k.hex() for k in records} and len(files) > 0
    assert None not in files  # no temp leftovers
    for key, record in records.items():
        assert files[key.hex()].stat().st_size == record.nbytes
    assert index.totals() == (sum(r.nbytes for r in records.values()), len(records))
    index.close()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n




def test_next_request_reuses_blocks_still_waiting_for_their_write(app_factory, llama_model, reference):
    """A tight RAM budget, and B sent by the same client the moment A answers: A's ten
    blocks are far over budget and go to disk as one job (every file fsynced, then one
    index commit), so B's lookup comes while they are still queued. It must find them,
    held in RAM until written; once written, RAM is back within its budget."""
    budget = 1 << 20  # two 64-token blocks of this model
    daemon = app_factory(llama_model, "--ram-budget", str(budget))
    first = agent_messages(question="List the files.")
    second = agent_messages(question="Now run the tests and report what failed.")
    client = daemon.client()  # made up front: a new client's set-up would give the writer time

    def ask_now(messages):
        response = client.chat.completions.create(model=str(daemon.model), messages=messages,
                                                  max_tokens=MAX_TOKENS, temperature=0)
        return response.choices[0].message.content, response.usage.model_dump()

    ask_now(first)
    text, usage = ask_now(second)
    assert text == reference.chat(second, MAX_TOKENS)
    shared = _common_prefix(reference.chat_tokens(first), reference.chat_tokens(second))
    assert shared > 8 * TEST_BLOCK_SIZE
    assert usage["kvtier"]["ram_tokens"] + usage["kvtier"]["disk_tokens"] == shared
    daemon.get("/cache/entries")  # waits for the writer
    ram = daemon.get("/cache/stats")["ram"]
    assert ram["pending_bytes"] == 0 and ram["bytes"] <= budget
