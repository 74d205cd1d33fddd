"""A generated model that answers every chat prompt with the same script: a bigram model.

Random test models never write a tool call, so the routes' tool-call paths need a model that
does. This one keeps the tiny test model's tokenizer and weights but silences every layer
(attention and MLP outputs zero), so the next token depends on the last one only; each token
of the script gets an embedding axis of its own and the output head maps it to the next one,
from the chat prompt's last token ("\\n" after "assistant") to EOS. The rest of the head stays
random, so log-probabilities and their alternatives are real, distinct numbers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

PEAK = 20.0  # the scripted token's logit over the others' (~N(0, 1)): greedy always takes it, sampling all but always


def make_scripted_model(base: Path, out: Path, script: str, words: tuple[str, ...] = ()) -> Path:
    """`base` (a generated llama) at `out`, rewired to answer `script` then EOS. `words`
    become tokens of their own (printable ASCII, no spaces: the byte-level detokenizer
    spells them as they are): a script that needs a piece more often than the vocabulary
    has distinct tokens for it (a JSON tool call's quotes) spells it with a word."""
    from safetensors.numpy import load_file, save_file
    from transformers import AutoTokenizer

    out.mkdir(parents=True)
    shutil.copy(base / "tokenizer_config.json", out / "tokenizer_config.json")
    config = json.loads((base / "config.json").read_text())
    vocab = config["vocab_size"]
    described = json.loads((base / "tokenizer.json").read_text())
    described["added_tokens"] += [
        {"id": vocab + i, "content": word, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": False} for i, word in enumerate(words)]
    (out / "tokenizer.json").write_text(json.dumps(described))
    config["vocab_size"] = vocab + len(words)
    (out / "config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                           add_generation_prompt=True, tokenize=False)
    after = tokenizer.encode(prompt, add_special_tokens=False)[-1]
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    chain = [after, *distinct_tokens(tokenizer, script, taken={after, eos}), eos]
    weights = load_file(str(base / "model.safetensors"))
    hidden = config["hidden_size"]
    assert len(chain) - 1 <= hidden, f"a script of {len(chain) - 1} tokens needs that many axes"
    for name in weights:
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            weights[name] = np.zeros_like(weights[name])  # each layer adds nothing to its input
    weights["model.norm.weight"] = np.ones_like(weights["model.norm.weight"])
    rng = np.random.default_rng(0)
    embed = np.concatenate([weights["model.embed_tokens.weight"],
                            rng.standard_normal((len(words), hidden), np.float32)])
    # A plain head (the base's is sharpened): the others' logits ~N(0, 1), the script's PEAK more.
    head = rng.standard_normal((config["vocab_size"], hidden), np.float32) / np.sqrt(hidden)
    for axis, (token, successor) in enumerate(zip(chain, chain[1:])):
        embed[token] = 0.0
        embed[token, axis] = np.sqrt(hidden)  # RMSNorm leaves it as it is
        head[successor, axis] += PEAK / np.sqrt(hidden)
    weights["model.embed_tokens.weight"], weights["lm_head.weight"] = embed.astype(np.float32), head.astype(np.float32)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "mlx"})
    return out


def distinct_tokens(tokenizer, text: str, taken: set[int]) -> list[int]:
    """Token ids that spell `text`, none of them twice (a bigram model has one successor per
    token) nor in `taken`: at each place the longest unused token that fits."""
    spelled = {tokenizer.decode([i]): i for i in range(len(tokenizer))}
    ids: list[int] = []
    at = 0
    while at < len(text):
        fits = [piece for piece, i in spelled.items()
                if piece and text.startswith(piece, at) and i not in taken and i not in ids]
        if not fits:
            raise ValueError(f"no unused token spells {text[at:]!r}")
        piece = max(fits, key=len)
        ids.append(spelled[piece])
        at += len(piece)
    return ids
