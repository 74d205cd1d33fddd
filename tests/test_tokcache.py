"""kvtier.tokcache: a prompt tokenized incrementally (the tokens of a recent prompt's shared
prefix kept, only the rest tokenized) is token for token the prompt tokenized whole: on the
generated models' tokenizer and chat template, and on hand-built Hugging Face tokenizers with
tricky added tokens (lstrip, rstrip, single_word, normalized), a BOS-adding post-processor,
a sentencepiece-style Metaspace pre-tokenizer and a Llama-2-style normalizer."""

from __future__ import annotations

import json
from typing import Any, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from kvtier.prompt import Renderer
from kvtier.tokcache import IncrementalTokenizer, common_prefix_length

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
INST = ("{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]"
        "{% else %}{{ m.content }}</s>{% endif %}{% endfor %}")
CORPUS = ["hello world, héllo wörld", "the quick brown fox  jumps\n\tover the lazy dog",
          "日本語のテキスト 🙂 emoji", "def f(x):\n    return x[0] < 3 and y > {x}",
          "<|im_start|>user\nhi<|im_end|>\n", "[INST] question [/INST] answer</s>"] * 30
CHATML_SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
# Pieces of text that meet at the cuts: added tokens and parts of them, whitespace, unicode,
# characters a normalizer changes (NFKC: ﬁ, no-break space), the Metaspace mark.
PIECES = ["<|im_start|>", "<|im_end|>", "<s>", "</s>", "[INST]", "[/INST]", "<mask>", "{x}", "a<b",
          "<|im", "_start|>", "  ", " ", "\n", "\n\n", "\t", "hello", " world", "héllo", "wörld",
          "日本", "🙂", "<", "[", "|", ">", "▁", "_", "a", "b", "l", "x", "ﬁ", "\u00a0", "user\n",
          "assistant\n"]


def trained(normalizer=None, pre_tokenizer=None, decoder=None, bos: bool = False,
            added: Sequence[AddedToken] = (), specials: list[str] = CHATML_SPECIALS) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer, tokenizer.decoder = normalizer, decoder
    if pre_tokenizer is not None:
        tokenizer.pre_tokenizer = pre_tokenizer
    alphabet = sorted(set("".join(CORPUS + PIECES)))
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    if bos:  # adds <s> only with add_special_tokens, which chat prompts are tokenized without
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    tokenizer.add_tokens(list(added))
    return tokenizer


def byte_level() -> Tokenizer:
    """GPT-2-style bytes, a BOS template, an rstrip cut token, a normalized added token and a
    whitespace one."""
    return trained(pre_tokenizer=pre_tokenizers.ByteLevel(add_prefix_space=False), decoder=decoders.ByteLevel(),
                   bos=True, added=[AddedToken("[/INST]", rstrip=True, normalized=False),
                                    AddedToken("{x}", normalized=True), AddedToken("  ", normalized=False)])


def metaspace_first() -> Tokenizer:
    """Sentencepiece-style: NFKC, then ▁ for spaces and prepended to the text's first piece only."""
    return trained(normalizers.NFKC(), pre_tokenizers.Metaspace(prepend_scheme="first"),
                   decoders.Metaspace(prepend_scheme="first"), bos=True,
                   added=[AddedToken("[INST]", normalized=False), AddedToken("[/INST]", normalized=False)])


def metaspace_unsplit() -> Tokenizer:
    """As transformers builds Llama's tokenizer without its legacy behaviour: Metaspace with
    `prepend_scheme="first"` that does not split on the mark."""
    return trained(pre_tokenizer=pre_tokenizers.Metaspace(prepend_scheme="first", split=False),
                   decoder=decoders.Metaspace(prepend_scheme="first", split=False), bos=True,
                   added=[AddedToken("[INST]", normalized=False), AddedToken("[/INST]", normalized=False)])


def llama2_style() -> Tokenizer:
    """Llama 2's normalizer: ▁ prepended to every piece between added tokens, spaces as ▁."""
    return trained(normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]),
                   decoder=decoders.Metaspace(), bos=True,
                   added=[AddedToken("[INST]", normalized=False), AddedToken("[/INST]", normalized=False)])


def strips_and_words() -> Tokenizer:
    """<mask> takes the whitespace on its left and only whole words, so no cut before a `<`
    is safe; `[` still is. RoBERTa-style offsets: trimmed of the spaces byte-level folds in."""
    tokenizer = trained(pre_tokenizer=pre_tokenizers.ByteLevel(add_prefix_space=True), decoder=decoders.ByteLevel(),
                        bos=True, added=[AddedToken("<mask>", lstrip=True, single_word=True, normalized=False),
                                         AddedToken("[INST]", rstrip=True, normalized=False),
                                         AddedToken("[/INST]", lstrip=False, normalized=False)])
    tokenizer.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=True),
                                                    tokenizer.post_processor])
    return tokenizer


def with_hazard(token: AddedToken) -> Tokenizer:
    """An added token that would make a cut before `<s>` wrong, so none is made before a
    `<`; one before `[INST]` still is."""
    return trained(pre_tokenizer=pre_tokenizers.ByteLevel(add_prefix_space=False), decoder=decoders.ByteLevel(),
                   added=[token, AddedToken("[INST]", normalized=False)])


def spanning() -> Tokenizer:
    return with_hazard(AddedToken("a<s>b", normalized=False))  # matches from before the cut


def single_word() -> Tokenizer:
    return with_hazard(AddedToken("<s>x", single_word=True, normalized=False))  # dropped after a word


def left_strip() -> Tokenizer:
    return with_hazard(AddedToken("<s>l", lstrip=True, normalized=False))  # takes the space before


BUILDERS = [byte_level, metaspace_first, metaspace_unsplit, llama2_style, strips_and_words, spanning, single_word, left_strip]


def hf_fast(tokenizer: Tokenizer, template: str = CHATML):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   chat_template=template)


def wrapped(tokenizer: Tokenizer, template: str = CHATML):
    """As mlx-lm loads a tokenizer: its TokenizerWrapper around the Hugging Face one."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    return TokenizerWrapper(hf_fast(tokenizer, template))


@pytest.fixture(scope="module")
def built() -> dict:
    return {builder.__name__: builder() for builder in BUILDERS}


def incremental_of(hf) -> IncrementalTokenizer:
    incremental = IncrementalTokenizer.of(hf)
    assert incremental is not None  # the tokenizers built here are all ones it takes
    return incremental


def encoded_ids(incremental: IncrementalTokenizer, text: str) -> list[int]:
    encoded = incremental.encode(text)
    assert encoded is not None
    return list(encoded.ids)


def whole(hf, text: str) -> tuple[list[int], list[int]]:
    """The text tokenized whole as the chat template's tokenize=True does, and its token ends."""
    ids = list(hf(text, add_special_tokens=False)["input_ids"])
    encoding = hf.backend_tokenizer.encode(text, add_special_tokens=False)
    assert encoding.ids == ids
    return ids, [end for _, end in encoding.offsets]


def test_cut_tokens_leave_out_the_added_tokens_a_cut_before_could_split_wrongly(built):
    def cuts(name: str) -> set[str]:
        return set(incremental_of(hf_fast(built[name])).cut_tokens.values())

    assert cuts("byte_level") == {"<s>", "</s>", "<|im_start|>", "<|im_end|>", "[/INST]"}  # not {x}, "  "
    assert cuts("metaspace_first") == {"<s>", "</s>", "<|im_start|>", "<|im_end|>", "[INST]", "[/INST]"}
    assert cuts("strips_and_words") == {"[INST]", "[/INST]"}  # <mask>: lstrip and single_word
    assert cuts("spanning") == cuts("single_word") == cuts("left_strip") == {"[INST]"}


@pytest.mark.parametrize("name, earlier, text", [
    ("spanning", "xa<s>", "xa<s>b"),  # a<s>b matches from before the cut
    ("single_word", "a<s>", "a<s>x"),  # <s>x at the cut, dropped after the word character `a`
    ("left_strip", "a <s>", "a <s>l"),  # <s>l at the cut, taking the space before it
])
def test_a_text_that_would_split_otherwise_at_a_recent_cut_tokenizes_as_whole(built, name, earlier, text):
    hf = hf_fast(built[name])
    incremental = incremental_of(hf)
    incremental.encode(earlier)
    assert encoded_ids(incremental, text) == whole(hf, text)[0]


@pytest.mark.parametrize("name", [b.__name__ for b in BUILDERS])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(st.floats(0.0, 1.0), st.lists(st.sampled_from(PIECES), max_size=12)),
                      min_size=2, max_size=8))
def test_growing_and_edited_texts_tokenize_as_whole(built, name, steps):
    """Each text keeps a (mostly whole) prefix of the one before and appends pieces: its
    incremental tokens and token ends equal the whole text's."""
    hf = hf_fast(built[name])
    incremental = incremental_of(hf)
    text = ""
    for keep, pieces in steps:
        kept = len(text) if keep > 0.3 else int(len(text) * keep / 0.3)
        text = text[:kept] + "".join(pieces)
        encoded = incremental.encode(text)
        assert encoded is not None and (list(encoded.ids), list(encoded.ends)) == whole(hf, text), repr(text)


CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a coding agent.  Use the tools;  never guess.\n"},
    {"role": "user", "content": "Find the block size  \n\n"},
    {"role": "assistant", "content": " I'll search.", "tool_calls": [
        {"type": "function", "function": {"name": "grep", "arguments": {"pattern": "block_size", "path": "kvtier/"}}}]},
    {"role": "tool", "content": "kvtier/config.py:12: block_size: int = 128  # tokens\n\t"},
    {"role": "assistant", "content": "It is 128 tokens — set in `kvtier/config.py`. 🙂 "},
    {"role": "user", "content": "Übersicht bitte:\n- <b>fett</b> [INST] and <|im_end|> as text\n"},
    {"role": "assistant", "content": "\n\nSure: 日本語 too.\n"},
    {"role": "user", "content": " Thanks."},
]
TOOLS = [{"type": "function", "function": {
    "name": "grep", "description": "Search files.",
    "parameters": {"type": "object", "properties": {"pattern": {"type": "string"}, "path": {"type": "string"}},
                   "required": ["pattern"]}}}]


def check_conversation(tokenizer, boundaries: bool, tools=None, conversation=CONVERSATION) -> Renderer:
    """Each turn's prompt (tokens and message ends) equals the prompt rendered and tokenized
    whole; returns the renderer, whose incremental tokenizer took the turns."""
    renderer, whole_renderer = Renderer(tokenizer, boundaries), Renderer(tokenizer, boundaries)
    whole_renderer.incremental = None  # every prompt tokenized whole, as before kvtier.tokcache
    assert renderer.incremental is not None
    for turn in range(2, len(conversation) + 1):
        messages = conversation[:turn]
        tokens, ends = renderer.render(messages, tools)
        expected = list(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True))
        assert tokens == expected, f"turn {turn}"
        assert (tokens, ends) == whole_renderer.render(messages, tools), f"turn {turn}"
    return renderer


@pytest.mark.parametrize("boundaries", [False, True], ids=["attention", "snapshot layers"])
@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no tools", "tools"])
def test_generated_models_conversation_turns_equal_whole_tokenization(llama_model, boundaries, tools):
    """The generated models' tokenizer and ChatML template (llama and the hybrids share it)."""
    from mlx_lm.utils import load_tokenizer

    renderer = check_conversation(load_tokenizer(llama_model), boundaries, tools)
    stats = renderer.stats()
    # Later turns tokenized only their new messages: far fewer tokens than all turns hold.
    assert stats["tokens_reused"] > 2 * stats["tokens_tokenized"] > 0


@pytest.mark.parametrize("name", ["byte_level", "metaspace_first", "metaspace_unsplit", "llama2_style",
                                  "strips_and_words"])
@pytest.mark.parametrize("template", [CHATML, INST], ids=["chatml", "inst"])
def test_hand_built_tokenizers_conversation_turns_equal_whole_tokenization(built, name, template):
    conversation = [m for m in CONVERSATION if m["role"] in ("user", "assistant")]
    renderer = check_conversation(wrapped(built[name], template), True, conversation=conversation)
    assert renderer.stats()["tokens_reused"] > 0


def test_state_that_changes_the_tokenizers_own_call_tokenizes_whole(built):
    """Truncation or padding set on the Rust tokenizer, or special tokens split: the
    tokenizer's own call differs from a plain encode, so the prompt is tokenized its way."""
    tokenizer = wrapped(built["byte_level"])
    renderer = Renderer(tokenizer, boundaries=False)
    messages = CONVERSATION[:4]
    backend = tokenizer._tokenizer.backend_tokenizer
    backend.enable_truncation(8)
    assert renderer.incremental is not None and renderer.incremental.encode("<|im_start|>user\nhello") is None
    assert renderer.chat_tokens(messages) == list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    backend.no_truncation()
    tokenizer._tokenizer.split_special_tokens = True
    assert renderer.incremental is not None and renderer.incremental.encode("<|im_start|>user\nhello") is None
    assert renderer.chat_tokens(messages) == list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def test_tokenizers_that_do_not_encode_piece_by_piece_have_no_incremental_path(built):
    from transformers import PreTrainedTokenizerFast

    class PreparesText(PreTrainedTokenizerFast):  # as CodeLlama's fill-in-the-middle does
        def _encode_plus(self, *args, **kwargs):
            return super()._encode_plus(*args, **kwargs)

    assert IncrementalTokenizer.of(PreparesText(tokenizer_object=built["byte_level"])) is None
    dropout = Tokenizer.from_str(built["byte_level"].to_str())
    state = json.loads(dropout.to_str())
    state["model"]["dropout"] = 0.1
    assert IncrementalTokenizer.of(hf_fast(Tokenizer.from_str(json.dumps(state)))) is None

    class Custom:
        def pre_tokenize(self, pretokenized):
            pretokenized.split(lambda i, piece: [piece])

    custom = hf_fast(built["byte_level"])
    custom.backend_tokenizer.pre_tokenizer = pre_tokenizers.PreTokenizer.custom(Custom())
    assert IncrementalTokenizer.of(custom) is None


@given(st.text(alphabet="ab\u00e9\U0001f642", max_size=600), st.text(alphabet="ab\u00e9\U0001f642", max_size=600))
def test_common_prefix_length_equals_a_character_loop(a, b):
    import os

    for x, y in ((a, b), (a, a + b), (a + b, a), (a + "a" + b, a + "b" + b)):
        assert common_prefix_length(x, y) == len(os.path.commonprefix([x, y]))


def test_conversations_tokenized_on_many_threads_at_once_each_equal_whole(built):
    """The routes render on a thread pool: texts of several conversations, interleaved."""
    from concurrent.futures import ThreadPoolExecutor

    hf = hf_fast(built["byte_level"])
    incremental = incremental_of(hf)

    def converse(seed: int) -> list[str]:
        text, wrong = f"<|im_start|>system\nagent {seed}<|im_end|>\n", []
        for turn in range(12):
            text += f"<|im_start|>user\nstep {turn} of {seed}  <|im_end|>\n<|im_start|>assistant\n"
            if encoded_ids(incremental, text) != whole(hf, text)[0]:
                wrong.append(text)
            text += f"done {turn}\n<|im_end|>\n"
        return wrong

    with ThreadPoolExecutor(4) as pool:
        assert [w for ws in pool.map(converse, range(12)) for w in ws] == []
    assert incremental.tokens_reused > incremental.tokens_tokenized


@pytest.fixture(scope="module")
def generated_tokenizer(llama_model):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(llama_model)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=st.lists(st.tuples(st.sampled_from(["user", "assistant", "tool"]),
                                st.lists(st.sampled_from(PIECES + ["<tool_call>", "</tool_response>"]), max_size=8)),
                      min_size=1, max_size=6))
def test_random_conversations_in_the_generated_template_equal_whole_tokenization(generated_tokenizer, turns):
    """Message contents made of added tokens, their parts, whitespace and unicode, meeting
    the template's own added tokens at every joint."""
    renderer = Renderer(generated_tokenizer, boundaries=True)
    messages = [{"role": "system", "content": "Agent."}]
    for role, pieces in turns:
        messages = messages + [{"role": role, "content": "".join(pieces)}]
        expected = list(generated_tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        assert renderer.chat_tokens(messages) == expected, messages


@pytest.mark.parametrize("name", ["byte_level", "metaspace_first", "metaspace_unsplit", "llama2_style",
                                  "strips_and_words"])
def test_a_remembered_token_sequence_leaves_the_next_prompt_exact(built, name):
    """After a restart the newest conversations' tokens are remembered as the text they decode
    to; the next turn's prompt is tokenized exactly whether that text decodes back or not."""
    tokenizer = wrapped(built[name])
    renderer = Renderer(tokenizer, boundaries=False)
    conversation = [m for m in CONVERSATION if m["role"] in ("user", "assistant")]
    earlier = list(tokenizer.apply_chat_template(conversation[:2], add_generation_prompt=True))
    assert renderer.remember([earlier]) == 1
    assert renderer.stats()["tokens_tokenized"] == 0  # not a request's text
    for count in (2, 4):
        messages = conversation[:count]
        assert renderer.chat_tokens(messages) == list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def test_the_generated_models_remembered_conversation_is_reused_by_its_next_turn(llama_model):
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(llama_model)
    renderer = Renderer(tokenizer, boundaries=False)
    earlier = list(tokenizer.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True))
    renderer.remember([earlier])
    messages = CONVERSATION[:4]
    assert renderer.chat_tokens(messages) == list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    assert renderer.stats()["tokens_reused"] > len(earlier) // 2
