"""Each token's own bytes (the `bytes` of a log-probability entry), through mlx-lm's tokenizer
loader, for the two vocabularies it streams specially: byte-level BPE and sentencepiece with
byte fallback. A token may hold part of a character, where its decoded text alone is U+FFFD."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CORPUS = ["the quick brown fox jumps over the lazy dog", "def read_config(path): return path"] * 50
TEXT = "the fox naïvely reads “config” ✓"  # characters the vocabulary never saw: split into bytes


def _bpe(tokenizers):
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=["</s>"], show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    return tok, trainer


def _sentencepiece(tokenizers):
    """Llama-2 style: metaspace words, bytes as <0xNN> tokens where no piece fits."""
    d = tokenizers.decoders
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = d.Sequence([d.Replace("▁", " "), d.ByteFallback(), d.Fuse(), d.Strip(" ", 1, 0)])
    specials = ["<unk>", "</s>", *[f"<0x{b:02X}>" for b in range(256)]]
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=500, special_tokens=specials, show_progress=False)
    return tok, trainer


@pytest.mark.parametrize("build, detokenizer", [(_bpe, "BPEStreamingDetokenizer"),
                                                 (_sentencepiece, "SPMStreamingDetokenizer")])
def test_tokens_bytes_spell_the_text(build, detokenizer, tmp_path: Path):
    tokenizers = pytest.importorskip("tokenizers")
    from mlx_lm.tokenizer_utils import load

    from kvtier.text import token_bytes

    tok, trainer = build(tokenizers)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>"}))
    wrapper = load(tmp_path)
    stream = wrapper.detokenizer
    assert type(stream).__name__ == detokenizer  # the vocabulary mlx-lm reads specially
    ids = wrapper.encode(TEXT, add_special_tokens=False)
    pieces = [token_bytes(wrapper, stream, i) for i in ids]
    assert any(p.decode(errors="replace") == "\ufffd" for p in pieces)  # a token of part of a character
    assert b"".join(pieces).removeprefix(b" ") == TEXT.encode()
