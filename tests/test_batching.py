"""Continuous batching: requests restored from the tiers, prefilled in chunks between decode
steps and decoded in one mlx-lm batch give plain mlx-lm's greedy text, for every
architecture; a cancelled stream leaves the batch and the others finish right. Through the
daemon, its app is served in the test process (tests/inprocess.py)."""

from __future__ import annotations

import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import pytest

from tests.conftest import MODELS, Reference, agent_messages
from tests.support.testmodels import ARCHES, make_model

MAX_TOKENS = 10
QUESTIONS = ("List the files.", "Run the tests now and say which fail.", "Why?")


@pytest.fixture(scope="module", params=ARCHES)
def arch_model(request):
    return make_model(MODELS / request.param, request.param)


def _conversation(question: str) -> list[dict]:
    return agent_messages("batch", question=question, repeat=2)  # longer than a sliding window


@pytest.mark.parametrize("interleaved", [False, True], ids=["batched", "interleaved"])
def test_batched_texts_equal_mlx_lm_for_every_architecture(arch_model, interleaved, tmp_path):
    from kvtier.config import CacheConfig
    from kvtier.engine import Engine
    from kvtier.requests import GenerationRequest
    from kvtier.scheduler import BATCHED, INTERLEAVED, Scheduler

    reference = Reference(arch_model)
    engine = Engine(str(arch_model), CacheConfig(cache_dir=tmp_path, block_size=64), prefill_step_size=64)
    done = object()
    try:
        batch = Scheduler(engine, max_size=4, done=done, mode=INTERLEAVED if interleaved else BATCHED)
        first = [_conversation(q) for q in QUESTIONS]
        # Round two: a follow-up turn restored from the tiers, joined while others decode.
        follow_up = first[0] + [{"role": "assistant", "content": reference.chat(first[0], MAX_TOKENS)},
                                {"role": "user", "content": "Continue."}]
        rounds = [(first, [0, 0, 3]), ([follow_up, first[1]], [0, 2])]
        for conversations, join_at in rounds:
            outputs: list[list] = [[] for _ in conversations]
            step = 0
            while step <= max(join_at) or not batch.idle:
                for i in (i for i, at in enumerate(join_at) if at == step):
                    tokens = engine.renderer.chat_tokens(conversations[i])
                    batch.add(GenerationRequest(tokens, MAX_TOKENS, temperature=0.0,
                                                boundaries=engine.renderer.message_boundaries(conversations[i], None, tokens)),
                              outputs[i].append)
                batch.step()
                step += 1
            texts = []
            for conversation, items in zip(conversations, outputs):
                assert items[-1] is done and items[-2].finish_reason in ("length", "stop")
                texts.append("".join(item.text for item in items[:-1]))
                assert texts[-1] == reference.chat(conversation, MAX_TOKENS)
            assert len(set(texts)) == len(texts)  # the prompts lead to different texts
        usage = outputs[0][-2].usage  # the follow-up: its earlier turn came from the tiers
        assert usage.cached_tokens > 0
        assert batch.stats.decode_tokens > batch.stats.decode_steps  # several rows per step
    finally:
        engine.close()


def _record_passes(model: Any) -> list[tuple[int, ...]]:
    """The input shape of every forward pass `model` runs from now on (a subclass, as
    daemon/faults.py hooks it: mlx-lm reads the model's layers and make_cache)."""
    shapes: list[tuple[int, ...]] = []
    base = type(model)

    def forward(self, inputs, *args, **kwargs):
        shapes.append(tuple(inputs.shape))
        return base.__call__(self, inputs, *args, **kwargs)

    model.__class__ = type(f"Recorded{base.__name__}", (base,), {"__call__": forward})
    return shapes


@pytest.mark.parametrize("join_rests", [False, True], ids=["prefilled-alone", "rests-in-batch"])
def test_requests_prefilled_together_get_their_first_tokens_from_one_batched_pass(llama_model, tmp_path, join_rests):
    """Three requests admitted at once take no pass of their own for their first tokens: they
    join the batch with their prompts' last tokens and the batch's passes give the first
    tokens of all three (as mlx_lm.server's batched prefill does), the texts plain mlx-lm's.
    With `join_rests` their short prompts are not prefilled one by one either: one pass of
    three rows computes them."""
    from kvtier.config import CacheConfig
    from kvtier.engine import Engine
    from kvtier.requests import Chunk, GenerationRequest
    from kvtier.scheduler import BATCHED, Scheduler

    reference = Reference(llama_model)
    engine = Engine(str(llama_model), CacheConfig(cache_dir=tmp_path, block_size=64), prefill_step_size=64)
    done = object()
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]  # short: prefilled in one step
    try:
        batch = Scheduler(engine, max_size=4, done=done, mode=BATCHED, join_rests=join_rests)
        shapes = _record_passes(engine.model)
        outputs: list[list] = [[] for _ in conversations]
        first_at: list[int] = []  # passes run when each request's first text came out

        def collect(out: list) -> Callable[[object], None]:
            def emit(item: object) -> None:
                if not out and isinstance(item, Chunk) and item.text:
                    first_at.append(len(shapes))
                out.append(item)
            return emit

        for conversation, out in zip(conversations, outputs):
            batch.add(GenerationRequest(engine.renderer.chat_tokens(conversation), MAX_TOKENS, temperature=0.0),
                      collect(out))
        while not batch.idle:
            batch.step()
        for conversation, items in zip(conversations, outputs):
            assert items[-1] is done and "".join(item.text for item in items[:-1]) == reference.chat(conversation, MAX_TOKENS)
        assert len(first_at) == 3 and len(set(first_at)) == 1  # all three in the same step
        before = shapes[:first_at[0]]
        one_token_passes = [s for s in before if s[-1] == 1]
        assert one_token_passes and all(s == (3, 1) for s in one_token_passes), before
        prefills = [s for s in before if s[-1] > 1]
        assert all(s[0] == 3 for s in prefills) == join_rests, before  # one row each, or the three together
    finally:
        engine.close()


def test_a_request_cancelled_while_its_rest_is_in_the_batch_leaves_the_others_and_its_cache_right(
        llama_model, tmp_path):
    """A request that joined the batch with its prompt's rest and is cancelled before its first
    token leaves with whatever the batch computed of it: the others' answers are plain
    mlx-lm's, and the same question asked again (restoring what was kept of it) is too."""
    from kvtier.config import CacheConfig
    from kvtier.engine import Engine
    from kvtier.requests import GenerationRequest
    from kvtier.scheduler import BATCHED, Scheduler, generate

    reference = Reference(llama_model)
    engine = Engine(str(llama_model), CacheConfig(cache_dir=tmp_path, block_size=64), prefill_step_size=64)
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    try:
        batch = Scheduler(engine, max_size=4, done=object(), mode=BATCHED, join_rests=True)
        requests = [GenerationRequest(engine.renderer.chat_tokens(c), MAX_TOKENS, temperature=0.0)
                    for c in conversations]
        outputs: list[list] = [[] for _ in conversations]
        for request, out in zip(requests, outputs):
            batch.add(request, out.append)
        batch.step()  # they join with their rests; the batch's first pass computes them
        assert not batch.prefilling and len(batch.decoding) == 3 and not any(outputs)
        requests[1].cancelled.set()
        while not batch.idle:
            batch.step()
        for i in (0, 2):
            assert "".join(item.text for item in outputs[i][:-1]) == reference.chat(conversations[i], MAX_TOKENS)
        assert outputs[1][-2].finish_reason == "cancelled" and outputs[1][-1] is batch.done
        again = GenerationRequest(engine.renderer.chat_tokens(conversations[1]), MAX_TOKENS, temperature=0.0)
        assert "".join(chunk.text for chunk in generate(engine, again)) == reference.chat(conversations[1], MAX_TOKENS)
    finally:
        engine.close()


def _stream(daemon, messages: list[dict], out: dict, key: str, cancel_after: int | None = None) -> None:
    stream = daemon.client().chat.completions.create(
        model=str(daemon.model), messages=messages, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True})
    text, pieces = "", 0
    for event in stream:
        if event.choices and event.choices[0].delta.content:
            text += event.choices[0].delta.content
            pieces += 1
            if cancel_after is not None and pieces >= cancel_after:
                stream.close()  # the client goes away mid-answer
                break
        if event.usage:
            out[key + "_usage"] = event.usage.model_dump()
    out[key] = text


def test_concurrent_streams_batch_and_a_cancelled_one_leaves(app_factory, llama_model, reference):
    daemon = app_factory(llama_model, "--max-batch", "3")
    health = daemon.get("/health")["batching"]
    assert health["enabled"] and health["max_batch"] == 3
    conversations = {"a": _conversation(QUESTIONS[0]), "b": _conversation(QUESTIONS[1]),
                     "c": _conversation(QUESTIONS[2])}
    out: dict = {}
    threads = [threading.Thread(target=_stream, args=(daemon, m, out, k, 2 if k == "c" else None))
               for k, m in conversations.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    for key in ("a", "b"):
        assert out[key] == reference.chat(conversations[key], 24), key
    assert out["a"] != out["b"]
    stats = daemon.get("/cache/stats")
    assert stats["batch"]["running"] == 0  # the cancelled stream left the batch too
    assert stats["counters"].get("requests_cancelled", 0) >= 1
    assert stats["batch"]["decode_tokens"] > 0 and stats["batch"]["queue_wait_seconds_total"] >= 0
    # A later turn reuses what the batched requests stored.
    again = daemon.client().chat.completions.create(model=str(daemon.model), messages=conversations["b"],
                                                    max_tokens=24, temperature=0)
    assert again.choices[0].message.content == out["b"]
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    with urllib.request.urlopen(daemon.url + "/metrics", timeout=30) as response:
        metrics = response.read().decode()
    for name in ("kvtier_batch_size", "kvtier_queue_wait_seconds_total", "kvtier_decode_tokens_per_second",
                 "kvtier_prefill_tokens_per_second"):
        assert name in metrics


def _at_once(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run the calls in threads started together; their results in order (errors raised)."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [future.result(timeout=300) for future in futures]


def test_seeded_sampling_runs_alone_and_repeats(app_factory, llama_model):
    daemon = app_factory(llama_model, "--max-batch", "3")
    messages = agent_messages("batch", question="Say something.", repeat=1)

    def ask() -> str | None:
        return daemon.client().chat.completions.create(
            model=str(daemon.model), messages=messages, max_tokens=8, temperature=1.0, seed=11
        ).choices[0].message.content

    out = _at_once([ask, ask])
    assert out[0] is not None and out[0] == out[1]


@pytest.mark.parametrize("arch, exact", [("llama", False), ("llama", True), ("nemotron_h", False)])
def test_the_start_up_check_is_reported_and_answers_stay_exact(app_factory, arch, exact):
    """By default requests batch and /health reports the start-up check's verdict (under
    OpenBLAS, which the daemon preloads on Linux, batched decode is not bit-identical at
    these small widths); with --exact they interleave, each decoding its own row, unless
    batching measured bit-identical. Concurrent greedy answers are plain mlx-lm's."""
    model = make_model(MODELS / arch, arch)
    daemon = app_factory(model, "--max-batch", "4", *(["--exact"] if exact else []))
    batching = daemon.get("/health")["batching"]
    assert batching["reason"] and batching["max_batch"] == 4
    measured_exact = batching["max_logprob_difference"] == 0
    assert batching["mode"] == ("interleaved" if exact and not measured_exact else "batched")
    assert batching["enabled"] == (batching["mode"] == "batched")
    assert batching["exact"] == (measured_exact or batching["mode"] == "interleaved")
    # Short prompts starting together are prefilled in one pass only where that gives up nothing exact.
    assert batching["batched_prefill"] == (batching["mode"] == "batched" and not batching["exact"])
    reference = Reference(model)
    conversations = [_conversation(q) for q in QUESTIONS[:2]]

    def asker(messages: list[dict]) -> Callable[[], str | None]:
        return lambda: daemon.client().chat.completions.create(
            model=str(model), messages=messages, max_tokens=MAX_TOKENS, temperature=0
        ).choices[0].message.content

    answers = _at_once([asker(c) for c in conversations])
    assert answers == [reference.chat(c, MAX_TOKENS) for c in conversations]


@pytest.mark.parametrize("arch, second_joins", [("llama", "at_once"), ("llama", "while_the_first_decodes"),
                                                ("nemotron_h", "while_the_first_decodes")])
def test_same_uncached_prefix_is_computed_once(arch, second_joins, tmp_path):
    """Two requests with one long uncached system prompt: the second, arriving together with
    the first, waits for the blocks the first is computing and restores them; arriving once
    the first decodes (its blocks are stored only when it ends), it has the first store them
    and restores them. Either way it does not compute them again (a hybrid model's up to the
    last snapshot in the shared prefix, the system message's end)."""
    from kvtier.config import CacheConfig
    from kvtier.engine import Engine
    from kvtier.requests import GenerationRequest
    from kvtier.scheduler import Scheduler

    model = make_model(MODELS / arch, arch)
    reference = Reference(model)
    engine = Engine(str(model), CacheConfig(cache_dir=tmp_path, block_size=64), prefill_step_size=64)
    done = object()
    try:
        batch = Scheduler(engine, max_size=4, done=done)
        conversations = [_conversation(QUESTIONS[0]), _conversation(QUESTIONS[1])]
        tokens = [engine.renderer.chat_tokens(c) for c in conversations]
        boundaries = [engine.renderer.message_boundaries(c, None, t) for c, t in zip(conversations, tokens)]
        outputs: list[list] = [[], []]
        for i, out in enumerate(outputs):
            if i == 1 and second_joins == "while_the_first_decodes":
                while batch.prefilling:
                    batch.step()
                assert len(batch.decoding) == 1
            batch.add(GenerationRequest(tokens[i], MAX_TOKENS, temperature=0.0, boundaries=boundaries[i]),
                      out.append)
        while not batch.idle:
            batch.step()
        shared = next(i for i, (a, b) in enumerate(zip(*tokens)) if a != b)
        usages = [out[-2].usage for out in outputs]
        assert usages[0].cached_tokens == 0
        if engine.cache_plan.needs_snapshots:
            assert usages[1].cached_tokens == max(b for b in boundaries[1] if b <= shared) > 0
        else:
            assert usages[1].cached_tokens == shared > 0  # the whole shared prefix, computed once
        assert engine.store.stats()["counters"]["tokens_computed"] == \
            len(tokens[0]) + len(tokens[1]) - usages[1].cached_tokens
        texts = ["".join(item.text for item in out[:-1]) for out in outputs]
        for conversation, text in zip(conversations, texts):
            assert text == reference.chat(conversation, MAX_TOKENS)
        assert texts[0] != texts[1]
    finally:
        engine.close()


def test_a_quantized_kv_cache_interleaves_with_plain_mlx_lm_s_text(llama_model, tmp_path):
    """mlx-lm cannot batch a QuantizedKVCache (`--kv-bits`): such requests interleave, each
    decoding its own row, and answer as plain mlx-lm with that cache does."""
    import mlx.core as mx
    import mlx_lm

    from kvtier import kvstate
    from kvtier.config import CacheConfig
    from kvtier.engine import Engine
    from kvtier.exactness import measure_exactness
    from kvtier.requests import GenerationRequest
    from kvtier.scheduler import INTERLEAVED, Scheduler

    engine = Engine(str(llama_model), CacheConfig(cache_dir=tmp_path, block_size=64, kv_bits=8))
    done = object()
    try:
        verdict = measure_exactness(engine)
        assert not verdict.exact and "QuantizedKVCache" in verdict.reason
        conversations = [agent_messages(project, question=q, repeat=2)
                         for project, q in (("delta", QUESTIONS[0]), ("omega", QUESTIONS[1]))]
        tokens = [engine.renderer.chat_tokens(c) for c in conversations]
        outputs: list[list] = [[], []]
        batch = Scheduler(engine, max_size=4, done=done, mode=INTERLEAVED)
        batch.add(GenerationRequest(tokens[0], MAX_TOKENS, temperature=0.0), outputs[0].append)
        while batch.prefilling:
            batch.step()
        batch.add(GenerationRequest(tokens[1], MAX_TOKENS, temperature=0.0), outputs[1].append)
        while not batch.idle:
            batch.step()
        assert batch.stats.decode_tokens > batch.stats.decode_steps  # both decoded in the same steps
        for t, out in zip(tokens, outputs):
            prompt_cache = kvstate.make_cache(engine.model, kvstate.Quantization(bits=8))
            engine.model(mx.array(t[:-1])[None], cache=prompt_cache)  # one chunk, as the daemon
            expected = mlx_lm.generate(engine.model, engine.tokenizer, prompt=t[-1:], max_tokens=MAX_TOKENS,
                                       prompt_cache=prompt_cache)
            assert out[-1] is done and "".join(item.text for item in out[:-1]) == expected
    finally:
        engine.close()


@pytest.mark.parametrize("path", ["alone", "batched", "interleaved"])
def test_logprobs_are_mlx_lm_s_on_every_decode_path(llama_model, path, tmp_path):
    """A request asking for log-probabilities gets, token by token, the numbers plain mlx-lm's
    `generate_step` decodes from, and its likeliest alternatives, whether it runs alone
    (a scheduler of one), in a batch or interleaved; one entry per completion token, and a
    request not asking gets none. The turn restored from the cache gets the same numbers."""
    from kvtier.config import CacheConfig
    from kvtier.engine import Engine
    from kvtier.requests import GenerationRequest
    from kvtier.scheduler import BATCHED, INTERLEAVED, Scheduler, generate

    reference = Reference(llama_model)
    engine = Engine(str(llama_model), CacheConfig(cache_dir=tmp_path, block_size=64), prefill_step_size=64)
    done = object()
    conversations = [_conversation(q) for q in QUESTIONS[:2]]
    try:
        batch = Scheduler(engine, max_size=4, done=done, mode=INTERLEAVED if path == "interleaved" else BATCHED)

        def run(asked: list[int | None]) -> list[list]:
            requests = [GenerationRequest(engine.renderer.chat_tokens(c), MAX_TOKENS, temperature=0.0,
                                          logprobs=n) for c, n in zip(conversations, asked)]
            if path == "alone":
                return [list(generate(engine, r)) for r in requests]
            outputs: list[list] = [[] for _ in requests]
            for request, out in zip(requests, outputs):
                batch.add(request, out.append)
            while not batch.idle:
                batch.step()
            return [out[:-1] for out in outputs]

        first, again = run([3, None]), run([3, 0])
        for chunks, conversation in zip(first, conversations):
            assert "".join(c.text for c in chunks) == reference.chat(conversation, MAX_TOKENS)
        assert not [e for c in first[1] for e in c.logprobs]
        entries = [e for c in first[0] for e in c.logprobs]
        assert len(entries) == first[0][-1].usage.completion_tokens == MAX_TOKENS
        expected = reference.logprobs(reference.chat_tokens(conversations[0]), MAX_TOKENS)
        for entry, (token, row) in zip(entries, expected):
            assert entry.token.decode(errors="replace") == reference.tokenizer.decode([token])
            assert entry.logprob == pytest.approx(row[token], abs=1e-4)
            likeliest = sorted(range(len(row)), key=lambda i: -row[i])[:3]
            assert [v for _, v in entry.top] == pytest.approx([row[i] for i in likeliest], abs=1e-4)
        assert again[0][-1].usage.cached_tokens > 0
        restored = [e for c in again[0] for e in c.logprobs]
        assert [e.token for e in restored] == [e.token for e in entries]
        assert [e.logprob for e in restored] == pytest.approx([e.logprob for e in entries], abs=1e-4)
        alone = [e for c in again[1] for e in c.logprobs]  # top 0: the token's own entry only
        assert len(alone) == again[1][-1].usage.completion_tokens > 0 and not any(e.top for e in alone)
    finally:
        engine.close()


# -- a step that fails ----------------------------------------------------------------------
def _greedy_tokens(reference: Reference, tokens: list[int], n: int) -> list[int]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    return [int(t) for t, _ in generate_step(mx.array(tokens), reference.model, max_tokens=n)]


def _poison_token(generated: list[int], avoid: set[int]) -> int:
    """A token the request generates a few steps in (it then fails mid-decode, while a long
    prefill still runs) that no other prompt or answer of the test holds."""
    return next(t for i, t in enumerate(generated[:6]) if i >= 3 and t not in avoid and t not in generated[:i])


def _text(items: list) -> str:
    return "".join(item.text for item in items if hasattr(item, "text"))


@pytest.mark.parametrize("interleaved", [False, True], ids=["batched", "interleaved"])
def test_a_failing_step_fails_only_the_requests_it_computed(tiny_model, interleaved, tmp_path):
    """The model's forward raises (daemon/faults.py, as MLX raises mid-generation) for one
    request: at decode, every request decoding with it gets the error and one being
    prefilled meanwhile finishes right; at prefill, only that request fails. Nothing the
    failed ones computed is stored: later turns restore from the tiers and stay exact."""
    from daemon.faults import InjectedFault, fail_on_token
    from kvtier.config import CacheConfig
    from kvtier.engine import Engine
    from kvtier.requests import GenerationRequest
    from kvtier.scheduler import BATCHED, INTERLEAVED, Scheduler

    reference = Reference(tiny_model)
    engine = Engine(str(tiny_model), CacheConfig(cache_dir=tmp_path, block_size=64), prefill_step_size=64)
    done, n = object(), 16
    a, poisoned = _conversation(QUESTIONS[0]), _conversation(QUESTIONS[2])
    b = agent_messages("batch", question=QUESTIONS[1], repeat=8)  # a prefill of more steps than the poison takes
    tokens = {key: engine.renderer.chat_tokens(m) for key, m in (("a", a), ("b", b), ("p", poisoned))}
    generated = {key: _greedy_tokens(reference, t, n) for key, t in tokens.items()}
    poison = _poison_token(generated["p"], {*tokens["a"], *tokens["b"], *tokens["p"],
                                            *generated["a"], *generated["b"]})
    expected = {key: reference.chat(m, n) for key, m in (("a", a), ("b", b), ("p", poisoned))}
    fail_on_token(engine.model, poison)

    def run(*conversations: list[dict], join_when_decoding: int | None = None) -> list[list]:
        outputs: list[list] = [[] for _ in conversations]
        for i, (messages, out) in enumerate(zip(conversations, outputs)):
            if i == join_when_decoding:
                while batch.prefilling:
                    batch.step()
            t = engine.renderer.chat_tokens(messages)
            batch.add(GenerationRequest(t, n, temperature=0.0,
                                        boundaries=engine.renderer.message_boundaries(messages, None, t)), out.append)
        while not batch.idle:
            batch.step()
        return outputs

    try:
        batch = Scheduler(engine, max_size=4, done=done, mode=INTERLEAVED if interleaved else BATCHED)
        # At decode: b joins (and prefills) once a and the poisoned request decode.
        out_a, out_p, out_b = run(a, poisoned, b, join_when_decoding=2)
        for out in (out_a, out_p):
            assert out[-1] is done and isinstance(out[-2], InjectedFault)
        assert _text(out_p) and _text(out_p) != expected["p"]  # it failed mid-answer
        assert out_b[-1] is done and _text(out_b) == expected["b"], out_b

        # At prefill: a follow-up of the poisoned answer holds the token in its prompt.
        follow_up = poisoned + [{"role": "assistant", "content": expected["p"]},
                                {"role": "user", "content": "Continue."}]
        assert poison in engine.renderer.chat_tokens(follow_up)
        out_f, out_a = run(follow_up, a)
        assert len(out_f) == 2 and isinstance(out_f[0], InjectedFault) and out_f[1] is done
        assert out_a[-1] is done and _text(out_a) == expected["a"]

        # What the tiers hold is right: turns restored from a's and b's blocks are exact.
        a_next = a + [{"role": "assistant", "content": expected["a"]}, {"role": "user", "content": "Continue."}]
        for messages, out in zip((a_next, b), run(a_next, b)):
            assert _text(out) == reference.chat(messages, n)
            assert out[-2].usage.cached_tokens > 0
    finally:
        engine.close()


@pytest.mark.parametrize("mode, runs", [
    (("--max-batch", "1"), {"one at a time"}),
    (("--max-batch", "3"), {"batched"}),
    (("--max-batch", "3", "--exact"), {"batched", "interleaved"}),  # as the start-up check finds
], ids=["alone", "batched", "exact"])
def test_a_failed_generation_gets_the_api_error_and_the_daemon_serves_on(app_factory, tiny_model, mode, runs,
                                                                        monkeypatch):
    """Batched or not, a generation failing mid-answer is a 500 in the API's JSON shape, or
    in a stream (headers already sent) an error event the `openai` SDK raises."""
    import openai

    from daemon.errors import INTERNAL_ERROR
    from daemon.faults import ENV

    reference = Reference(tiny_model)
    poisoned, other = _conversation(QUESTIONS[2]), _conversation(QUESTIONS[0])
    tokens, other_tokens = reference.chat_tokens(poisoned), reference.chat_tokens(other)
    poison = _poison_token(_greedy_tokens(reference, tokens, 16),
                           {*tokens, *other_tokens, *_greedy_tokens(reference, other_tokens, 16)})
    monkeypatch.setenv(ENV, str(poison))  # read as the app loads its model (daemon/faults.py)
    daemon = app_factory(tiny_model, *mode)
    client = daemon.client()
    error = {"message": INTERNAL_ERROR, "type": "server_error", "param": None, "code": None}
    with pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(model=str(daemon.model), messages=poisoned, max_tokens=16, temperature=0)
    assert failed.value.body == error
    text = ""
    with pytest.raises(openai.APIError) as failed_stream:
        for event in client.chat.completions.create(model=str(daemon.model), messages=poisoned, max_tokens=16,
                                                    temperature=0, stream=True):
            text += event.choices[0].delta.content or ""
    assert failed_stream.value.body == error  # not a broken connection (APIConnectionError has none)
    assert text and reference.chat(poisoned, 16).startswith(text)
    answer = client.chat.completions.create(model=str(daemon.model), messages=other, max_tokens=16, temperature=0)
    assert answer.choices[0].message.content == reference.chat(other, 16)
    assert daemon.get("/health")["batching"]["mode"] in runs
