"""Small random-weight model directories that ``mlx_lm.load`` loads like real ones.

Tests and benchmarks cannot download models, so this module writes complete
model directories (config, float32 safetensors, a locally trained byte-level
BPE tokenizer with a chat template) for a few mlx-lm architectures that
exercise the cache types kvtier must handle.

Random weights need shaping to be useful: default init gives the same token
forever.  We use fan-in scaled normals, sharpen attention so greedy output
depends on the context, and scale the output head so the top logit usually
wins by a wide margin (cached and uncached runs must pick identical tokens
even though their float rounding differs).  Recurrent layers get slow decay
rates so their state remembers the prefix.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["ARCHES", "make_model", "demo_corpus"]

ARCHES = ("llama", "qwen3_next", "mamba2", "sliding", "nemotron_h")

# Bump when the generated files change, so stale cached models are rebuilt.
_FORMAT_VERSION = 3
_MARKER = "kvtier_testmodel.json"

_BOS = "<|endoftext|>"
_EOS = "<|im_end|>"
_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
]

# Qwen-style ChatML.  "<tool_call>" plus "tool_call.name" makes mlx-lm infer
# its json_tools parser, so tool calls round-trip through the server.
_CHAT_TEMPLATE = """\
{%- macro render_content(content) -%}
{%- if content is string -%}{{ content }}
{%- elif content -%}{%- for part in content -%}{%- if part.type == 'text' %}{{ part.text }}{% endif -%}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- set has_system = messages and messages[0].role == 'system' -%}
{%- if tools -%}
<|im_start|>system
{% if has_system %}{{ render_content(messages[0].content) }}

{% endif %}# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif has_system -%}
<|im_start|>system
{{ render_content(messages[0].content) }}<|im_end|>
{% endif -%}
{%- for message in messages -%}
{%- if loop.first and has_system -%}
{%- elif message.role == 'assistant' -%}
<|im_start|>assistant
{{ render_content(message.content) }}
{%- if message.tool_calls -%}
{%- for tool_call in message.tool_calls -%}
{%- if tool_call.function is defined %}{% set tool_call = tool_call.function %}{% endif %}
<tool_call>
{"name": "{{ tool_call.name }}", "arguments": {% if tool_call.arguments is string %}{{ tool_call.arguments }}{% else %}{{ tool_call.arguments | tojson }}{% endif %}}
</tool_call>
{%- endfor -%}
{%- endif -%}
<|im_end|>
{% elif message.role == 'tool' -%}
<|im_start|>tool
<tool_response>
{{ render_content(message.content) }}
</tool_response><|im_end|>
{% else -%}
<|im_start|>{{ message.role }}
{{ render_content(message.content) }}<|im_end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% endif -%}
"""


# --------------------------------------------------------------------------
# Demo corpus: synthetic coding-agent traffic, generated deterministically.
# --------------------------------------------------------------------------

_WORDS = (
    "cache block prefix token model server request response config path file "
    "index store disk memory tier page layer batch stream chunk hash key value "
    "session client handler worker queue buffer offset length limit timeout "
    "retry error status result parse load save write read flush sync evict "
    "entry record table header payload schema user agent tool message prompt "
    "context window state array tensor shape dtype device kernel thread lock"
).split()

# Broader English/programming vocabulary so BPE training finds enough distinct
# merges to fill a 4k vocabulary (a narrow corpus stops at ~2k tokens).
_PROSE_WORDS = (
    "the a an and or but if then else when while because although since until "
    "before after during about above below between through across against "
    "people time year way day thing man woman child world life hand part place "
    "case week company system program question work government number night "
    "point home water room mother area money story fact month lot right study "
    "book eye job word business issue side kind head house service friend father "
    "power hour game line end member law car city community name president team "
    "minute idea kid body information back parent face others level office door "
    "health person art war history party morning reason research girl guy moment "
    "air teacher force education foot boy age policy everything process music "
    "market sense nation plan college interest death experience effect use class "
    "control care field development role effort rate heart drug show leader light "
    "voice wife police mind price report decision son view relationship town road "
    "arm difference value building action model season society tax director "
    "position player record paper space ground form event official matter center "
    "couple site project activity star table need court oil situation cost industry "
    "figure street image phone data picture practice piece land product doctor "
    "wall patient worker news test movie north love support technology step baby "
    "computer type attention film tree source organization hair window evidence "
    "population site network security database function variable argument module "
    "package library framework interface method property attribute exception "
    "iterator generator decorator coroutine dictionary integer boolean string "
    "float tuple object instance inheritance compile runtime debug deploy release "
    "version branch commit merge rebase pull push fetch clone install upgrade "
    "dependency environment container image volume cluster node pod service "
    "endpoint route middleware authentication authorization token session cookie "
    "header query parameter response status latency throughput benchmark profile "
    "allocate release pointer reference mutable immutable concurrent parallel "
    "asynchronous synchronous callback promise future executor scheduler signal "
    "observe measure improve reduce increase quickly slowly carefully correctly "
    "simple complex large small new old good bad first last long short high low "
    "early late important different possible available likely certain clear "
    "recent strong free major whole real best better sure open full special easy "
    "hard ready similar private public local global final internal external"
).split()

_ENGLISH = (
    "Please update the function so that it handles the empty case correctly.",
    "I ran the tests again and two of them still fail with a timeout.",
    "Can you explain why the cache is evicted before the request finishes?",
    "The build passes locally but the CI job fails on Linux.",
    "Let me look at the file first and then propose a fix.",
    "I found the problem: the offset is computed before the lock is taken.",
    "This change keeps the public API the same and adds a regression test.",
    "Run the linter and make sure there are no new warnings.",
    "We should avoid loading the whole file into memory at once.",
    "The error happens only when the prompt is longer than the window.",
    "I will read the configuration and check which options are enabled.",
    "Here is a summary of what changed and why it is safe.",
    "Could you add type hints and a short docstring to the new helper?",
    "The benchmark shows a large speedup when the prefix is reused.",
    "That directory does not exist yet, so I will create it first.",
    "Thanks, that works. Now make the server restart without losing state.",
    "I could not reproduce the crash with the smaller input.",
    "The tokenizer splits the special tokens differently than expected.",
    "Next, I will write the tests and run the full suite.",
    "Done. All tests pass and the diff is ready for review.",
)

_SYSTEM_PROMPTS = (
    "You are an expert software engineering agent working in a terminal. "
    "You can read and edit files, run shell commands and search the code base. "
    "Think step by step, keep changes minimal, and always run the tests before "
    "you report that a task is complete.",
    "You are a helpful coding assistant. Answer concisely. When you need "
    "information about the repository, call one of the provided tools instead "
    "of guessing. Never invent file contents.",
    "You are Kit, an autonomous agent that fixes bugs in Python projects. "
    "Follow the project style guide, prefer small functions, and explain each "
    "change in one sentence. Use the shell tool to run pytest.",
)

_TOOLS: tuple[dict[str, Any], ...] = (
    {
        "name": "read_file",
        "description": "Read a text file from the workspace and return its contents.",
        "parameters": {
            "type": "object",
            "properties": {
                "path": {"type": "string", "description": "Path relative to the repository root."},
                "start_line": {"type": "integer", "description": "First line to return (1-based)."},
                "end_line": {"type": "integer", "description": "Last line to return, inclusive."},
            },
            "required": ["path"],
        },
    },
    {
        "name": "write_file",
        "description": "Create or overwrite a file with the given content.",
        "parameters": {
            "type": "object",
            "properties": {
                "path": {"type": "string", "description": "Destination path."},
                "content": {"type": "string", "description": "Full new file content."},
            },
            "required": ["path", "content"],
        },
    },
    {
        "name": "run_shell",
        "description": "Run a shell command in the repository and return stdout, stderr and the exit code.",
        "parameters": {
            "type": "object",
            "properties": {
                "command": {"type": "string", "description": "The command line to execute."},
                "timeout": {"type": "number", "description": "Seconds before the command is killed."},
            },
            "required": ["command"],
        },
    },
    {
        "name": "search_code",
        "description": "Search the code base with a regular expression.",
        "parameters": {
            "type": "object",
            "properties": {
                "pattern": {"type": "string", "description": "Regular expression to search for."},
                "glob": {"type": "string", "description": "Only search files matching this glob."},
                "max_results": {"type": "integer", "description": "Maximum number of matches."},
            },
            "required": ["pattern"],
        },
    },
    {
        "name": "edit_file",
        "description": "Replace an exact string in a file with a new string.",
        "parameters": {
            "type": "object",
            "properties": {
                "path": {"type": "string"},
                "old_str": {"type": "string", "description": "Text to replace; must be unique."},
                "new_str": {"type": "string", "description": "Replacement text."},
            },
            "required": ["path", "old_str", "new_str"],
        },
    },
    {
        "name": "list_directory",
        "description": "List the entries of a directory, optionally recursively.",
        "parameters": {
            "type": "object",
            "properties": {
                "path": {"type": "string"},
                "recursive": {"type": "boolean", "default": False},
            },
            "required": ["path"],
        },
    },
)


def _ident(rng: random.Random, parts: int = 2) -> str:
    return "_".join(rng.choice(_WORDS) for _ in range(parts))


def _python_snippet(rng: random.Random) -> str:
    name, arg, other = _ident(rng), rng.choice(_WORDS), rng.choice(_WORDS)
    cls = "".join(w.capitalize() for w in (rng.choice(_WORDS), rng.choice(_WORDS)))
    n = rng.randint(2, 64)
    kind = rng.randrange(4)
    if kind == 0:
        return (
            f"def {name}({arg}: list[int], {other}: int = {n}) -> dict[str, int]:\n"
            f'    """Return the {arg} grouped by {other}."""\n'
            f"    result: dict[str, int] = {{}}\n"
            f"    for i, item in enumerate({arg}):\n"
            f"        if item % {other} == 0:\n"
            f"            result[str(i)] = item\n"
            f"    return result\n"
        )
    if kind == 1:
        return (
            f"import os\nimport json\nfrom pathlib import Path\n\n\n"
            f"class {cls}:\n"
            f"    def __init__(self, {arg}: str, {other}: int = {n}) -> None:\n"
            f"        self.{arg} = {arg}\n"
            f"        self.{other} = {other}\n"
            f"        self._{name} = None\n\n"
            f"    def load(self, path: Path) -> dict:\n"
            f"        with open(path) as f:\n"
            f"            return json.load(f)\n"
        )
    if kind == 2:
        return (
            f"async def {name}(self, {arg}, *, {other}=None):\n"
            f"    try:\n"
            f"        value = await self.{rng.choice(_WORDS)}.get({arg})\n"
            f"    except KeyError as exc:\n"
            f"        raise ValueError(f\"missing {{{arg}!r}}\") from exc\n"
            f"    if value is None or len(value) > {n}:\n"
            f"        return []\n"
            f"    return [x for x in value if x.{other} is not None]\n"
        )
    return (
        f"def test_{name}(tmp_path):\n"
        f"    {arg} = {cls}(str(tmp_path), {n})\n"
        f"    assert {arg}.{other} == {n}\n"
        f"    with pytest.raises(ValueError):\n"
        f"        {arg}.load(tmp_path / \"{other}.json\")\n"
    )


def _shell_snippet(rng: random.Random) -> str:
    kind = rng.randrange(4)
    mod = rng.choice(_WORDS)
    if kind == 0:
        lines = ["$ ls -la src/"]
        for _ in range(rng.randint(3, 8)):
            size, day = rng.randint(100, 99999), rng.randint(1, 28)
            lines.append(f"-rw-r--r-- 1 dev dev {size:6d} Mar {day:2d} 10:{rng.randint(10, 59)} {_ident(rng)}.py")
        return "\n".join(lines) + "\n"
    if kind == 1:
        passed, failed = rng.randint(5, 300), rng.randint(0, 3)
        return (
            f"$ python -m pytest tests/test_{mod}.py -q\n"
            f"{'.' * rng.randint(5, 40)}{'F' * failed}\n"
            f"FAILED tests/test_{mod}.py::test_{_ident(rng)} - AssertionError: assert {rng.randint(0, 9)} == {rng.randint(10, 99)}\n"
            f"{failed} failed, {passed} passed in {rng.uniform(0.1, 30):.2f}s\n"
        )
    if kind == 2:
        return (
            "Traceback (most recent call last):\n"
            f'  File "/repo/src/{mod}.py", line {rng.randint(1, 400)}, in {_ident(rng)}\n'
            f"    return self.{rng.choice(_WORDS)}[{rng.choice(_WORDS)}]\n"
            f"KeyError: '{rng.choice(_WORDS)}'\n"
        )
    return (
        "$ git status --short\n"
        f" M src/{mod}.py\n M tests/test_{mod}.py\n?? notes/{_ident(rng)}.md\n"
        f"$ git diff --stat\n src/{mod}.py | {rng.randint(1, 80)} +++++---\n"
        f" 1 file changed, {rng.randint(1, 50)} insertions(+), {rng.randint(0, 30)} deletions(-)\n"
    )


def _chat_snippet(rng: random.Random) -> str:
    """One ChatML conversation turn sequence, as an agent would send it."""
    parts = [f"<|im_start|>system\n{rng.choice(_SYSTEM_PROMPTS)}"]
    if rng.random() < 0.5:
        tools = rng.sample(_TOOLS, k=rng.randint(1, len(_TOOLS)))
        parts.append("\n\n# Tools\n<tools>\n" + "\n".join(json.dumps(t) for t in tools) + "\n</tools>")
    parts.append("<|im_end|>\n")
    parts.append(f"<|im_start|>user\n{' '.join(rng.sample(_ENGLISH, k=rng.randint(1, 3)))}<|im_end|>\n")
    tool = rng.choice(_TOOLS)
    args = {"path": f"src/{rng.choice(_WORDS)}.py"} if "path" in tool["parameters"]["properties"] else {
        "command": f"grep -rn {rng.choice(_WORDS)} src/"}
    parts.append(
        f"<|im_start|>assistant\n{rng.choice(_ENGLISH)}\n<tool_call>\n"
        f"{json.dumps({'name': tool['name'], 'arguments': args})}\n</tool_call><|im_end|>\n"
    )
    body = _python_snippet(rng) if rng.random() < 0.5 else _shell_snippet(rng)
    parts.append(f"<|im_start|>tool\n<tool_response>\n{body}</tool_response><|im_end|>\n")
    parts.append(f"<|im_start|>assistant\n{' '.join(rng.sample(_ENGLISH, k=2))}<|im_end|>\n")
    return "".join(parts)


@functools.lru_cache(maxsize=1)
def _names() -> tuple[str, ...]:
    """Pronounceable made-up names (people, projects, files): more BPE merges."""
    rng = random.Random(7)
    onsets = "b c d f g h j k l m n p r s t v w z br ch cl dr gr kr pl sh st tr".split()
    vowels = "a e i o u ai ea io ou".split()
    codas = ["", "", "n", "r", "s", "l", "x", "nd", "rt"]

    def name() -> str:
        syllables = (rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.randint(1, 3)))
        return "".join(syllables) + rng.choice(codas)

    return tuple(name() for _ in range(1500))


def _prose_snippet(rng: random.Random) -> str:
    """Word-salad prose and comments: broad vocabulary, English-like spacing."""
    sentences = []
    names = _names()
    for _ in range(rng.randint(3, 8)):
        words = [
            rng.choice(names) if rng.random() < 0.25 else rng.choice(_PROSE_WORDS)
            for _ in range(rng.randint(6, 16))
        ]
        sentences.append(" ".join(words).capitalize() + rng.choice([".", ".", ",", "?", ":"]))
    prefix = rng.choice(["", "", "# ", "// ", "> ", "- "])
    return prefix + " ".join(sentences) + "\n"


@functools.lru_cache(maxsize=1)
def _demo_corpus_cached() -> tuple[str, ...]:
    rng = random.Random(20240601)
    makers: tuple[Callable[[random.Random], str], ...] = (
        _python_snippet,
        _shell_snippet,
        _chat_snippet,
        lambda r: " ".join(r.sample(_ENGLISH, k=r.randint(2, 6))) + "\n",
        _prose_snippet,
        lambda r: json.dumps(r.choice(_TOOLS), indent=2) + "\n",
    )
    return tuple(makers[i % len(makers)](rng) for i in range(600))


def demo_corpus() -> list[str]:
    """The deterministic text used to train the test tokenizer (~300 KB)."""
    return list(_demo_corpus_cached())


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    """Train a byte-level BPE on demo_corpus(); cached because training takes ~1 s."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(demo_corpus(), trainer=trainer)
    return tok.to_str()


def _tokenizer_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _BOS,
        "eos_token": _EOS,
        "pad_token": _BOS,
        "unk_token": None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "chat_template": _CHAT_TEMPLATE,
        "additional_special_tokens": [t for t in _SPECIAL_TOKENS if t not in (_BOS, _EOS)],
    }


def _write_tokenizer(out: Path, vocab_size: int) -> tuple[int, dict[str, int]]:
    """Write tokenizer files; return the real vocab size and special token ids."""
    from tokenizers import Tokenizer

    text = _tokenizer_json(vocab_size)
    (out / "tokenizer.json").write_text(text, encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2))
    tok = Tokenizer.from_str(text)
    ids = {t: tok.token_to_id(t) for t in _SPECIAL_TOKENS}  # all in the vocabulary written above
    return tok.get_vocab_size(with_added_tokens=True), ids  # type: ignore[return-value]


# --------------------------------------------------------------------------
# Architectures: config + how to initialise each parameter
# --------------------------------------------------------------------------

# An init rule maps (parameter name, shape, rng, config) to an array, or None
# to defer to _generic_init.
InitRule = Callable[
    [str, tuple[int, ...], np.random.Generator, dict[str, Any]], "np.ndarray | None"
]


def _round_up(x: float, m: int) -> int:
    return int(-(-int(x) // m) * m)


def _llama_config(hidden: int, layers: int, **_: Any) -> dict[str, Any]:
    heads = max(1, hidden // 64)
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": _round_up(hidden * 8 / 3, 64),
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 4),
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
    }


def _sliding_config(hidden: int, layers: int, **_: Any) -> dict[str, Any]:
    """Llama with interleaved sliding-window layers (3 sliding : 1 full).

    mlx-lm's llama gives sliding layers a RotatingKVCache; at least one full
    layer is required, and it keeps long-range context sensitivity.
    """
    config = _llama_config(hidden, layers)
    config["layer_types"] = [
        "full_attention" if (i + 1) % 4 == 0 or i == layers - 1 else "sliding_attention"
        for i in range(layers)
    ]
    config["sliding_window"] = 128
    return config


def _qwen3_next_config(hidden: int, layers: int, **_: Any) -> dict[str, Any]:
    """Hybrid gated-delta (ArraysCache) + gated full attention (KVCache), no MoE."""
    heads = max(1, hidden // 64)
    return {
        "model_type": "qwen3_next",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": _round_up(hidden * 8 / 3, 64),
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "head_dim": 64,
        "linear_num_value_heads": heads,
        "linear_num_key_heads": max(1, heads // 2),
        "linear_key_head_dim": 64,
        "linear_value_head_dim": 64,
        "linear_conv_kernel_dim": 4,
        # Every 4th layer is full attention; mlx-lm needs at least one.
        "full_attention_interval": min(4, layers),
        # num_experts=0 makes every layer a dense MLP (and sanitize a no-op).
        "num_experts": 0,
        "num_experts_per_tok": 1,
        "decoder_sparse_step": 1,
        "shared_expert_intermediate_size": 0,
        "moe_intermediate_size": 0,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.25,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
    }


def _mamba2_config(hidden: int, layers: int, **_: Any) -> dict[str, Any]:
    """Pure SSM: every layer's cache is an ArraysCache (conv state, ssm state). Like real
    Mamba2 configs, no max_position_embeddings: the architecture has no position limit."""
    return {
        "model_type": "mamba2",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_heads": 2 * hidden // 64,
        "head_dim": 64,
        "intermediate_size": 2 * hidden,
        "state_size": 64,
        "n_groups": 1,
        "conv_kernel": 4,
        "use_bias": False,
        "use_conv_bias": True,
        "layer_norm_epsilon": 1e-5,
        "time_step_limit": [0.001, 100.0],
        "time_step_rank": "auto",
        "tie_word_embeddings": False,
    }


def _nemotron_h_config(hidden: int, layers: int, **_: Any) -> dict[str, Any]:
    """Hybrid Mamba2 (ArraysCache) + attention (KVCache) + MLP layers (no cache), as in
    Nemotron-H: the layer stack is a pattern of M (mamba), * (attention), - (MLP). Every 4th
    layer and the last are attention, so there is one even at 2 layers."""
    pattern = "".join("*" if i % 4 == 3 or i == layers - 1 else "M" if i % 2 == 0 else "-"
                      for i in range(layers))
    heads = max(1, hidden // 64)
    return {
        "model_type": "nemotron_h",
        "hidden_size": hidden,
        "hybrid_override_pattern": pattern,
        "num_hidden_layers": layers,  # real checkpoints have it; mlx-lm before 0.32 requires it
        "intermediate_size": 4 * hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "head_dim": 64,
        "attention_bias": False,
        "mamba_num_heads": 2 * hidden // 64,
        "mamba_head_dim": 64,
        "mamba_proj_bias": False,
        "ssm_state_size": 64,
        "conv_kernel": 4,
        "n_groups": 1,
        "mlp_bias": False,
        "use_bias": False,
        "use_conv_bias": True,
        "layer_norm_epsilon": 1e-5,
        "time_step_limit": [0.001, 100.0],
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
    }


# Multipliers on the fan-in init.  Q and K scaled by 2 each make attention
# logits ~4x sharper, so attention picks out specific earlier tokens.
_QK_SCALE = 2.0
# Same effect for models that RMS-normalise q and k (the norm undoes any
# projection scale, so the norm weight carries it instead).
_QK_NORM_GAIN = 2.0
# lm_head gain: logit std ~10, so the softmax is peaked and the top-1/top-2
# logprob gap (median ~2 nats) dwarfs chunked-vs-full prefill rounding (~2e-4).
_HEAD_GAIN = 10.0


def _log_timescales(n: int, lo: float, hi: float) -> np.ndarray:
    """A_log values spread from lo to hi: per-head decay rates exp(A_log).

    Small values (slow decay) let recurrent state remember a long prefix; the
    spread keeps some fast heads for local context.
    """
    return np.linspace(lo, hi, n, dtype=np.float32)


def _common_init(
    name: str, shape: tuple[int, ...], rng: np.random.Generator, config: dict[str, Any]
) -> np.ndarray | None:
    if name.endswith(("q_norm.weight", "k_norm.weight")):
        return np.full(shape, _QK_NORM_GAIN, np.float32)
    if name.endswith(("q_proj.weight", "k_proj.weight")):
        return _fan_in(shape, rng, _QK_SCALE)
    if name == "lm_head.weight":
        return _fan_in(shape, rng, _HEAD_GAIN)
    return None


def _qwen3_next_init(
    name: str, shape: tuple[int, ...], rng: np.random.Generator, config: dict[str, Any]
) -> np.ndarray | None:
    if name.endswith("A_log"):
        # Decay per token ~ exp(-exp(A_log) * dt) with dt ~ 1.3: heads range
        # from a ~1e4-token memory down to a ~20-token one.
        return _log_timescales(shape[0], -9.0, -3.0)
    return _common_init(name, shape, rng, config)


# Mamba2 tuning, found by measuring how often greedy output changes when one
# early or middle word of a 1,500-token prompt changes.  Default-like values
# (dt_bias 1, unit dt gain) wash the prefix out of the SSM state.
_MAMBA2_DT_GAIN = 8.0  # spiky dt: few tokens write strongly (selective memory)
_MAMBA2_DT_BIAS = -6.0  # softplus(-6) ~ 0.0025: most tokens barely write
_MAMBA2_OUT_GAIN = 2.0  # mixer output outweighs the token embedding


def _mamba2_init(
    name: str, shape: tuple[int, ...], rng: np.random.Generator, config: dict[str, Any]
) -> np.ndarray | None:
    if name.endswith("A_log"):
        return _log_timescales(shape[0], -12.0, -4.0)
    if name.endswith("dt_bias"):
        return np.full(shape, _MAMBA2_DT_BIAS, np.float32)
    if name.endswith("mixer.in_proj.weight"):
        w = _fan_in(shape, rng)
        w[-config["num_heads"] :] *= _MAMBA2_DT_GAIN  # the last rows produce dt
        return w
    if name.endswith("mixer.out_proj.weight"):
        return _fan_in(shape, rng, _MAMBA2_OUT_GAIN)
    return _common_init(name, shape, rng, config)


# Nemotron-H tuning, found as Mamba2's (how often greedy output changes with the question
# after a long system prompt). Mamba mixers share the residual stream with attention and
# relu^2 MLPs here: louder mixers and quieter (token-local) MLPs let the context show.
_NEMOTRON_H_MAMBA_OUT_GAIN = 4.0
_NEMOTRON_H_MLP_GAIN = 0.5


def _nemotron_h_init(
    name: str, shape: tuple[int, ...], rng: np.random.Generator, config: dict[str, Any]
) -> np.ndarray | None:
    """Its mamba layers tuned as Mamba2's (its heads count is `mamba_num_heads`)."""
    if name.endswith("mixer.out_proj.weight"):
        return _fan_in(shape, rng, _NEMOTRON_H_MAMBA_OUT_GAIN)
    if name.endswith("mixer.down_proj.weight"):
        return _fan_in(shape, rng, _NEMOTRON_H_MLP_GAIN)
    return _mamba2_init(name, shape, rng, dict(config, num_heads=config["mamba_num_heads"]))


_ARCH_SPECS: dict[str, tuple[Callable[..., dict[str, Any]], InitRule, dict[str, int]]] = {
    # arch: (config builder, init rule, default hidden/layers)
    "llama": (_llama_config, _common_init, {"hidden": 512, "layers": 8}),
    "qwen3_next": (_qwen3_next_config, _qwen3_next_init, {"hidden": 256, "layers": 8}),
    "mamba2": (_mamba2_config, _mamba2_init, {"hidden": 256, "layers": 4}),
    "sliding": (_sliding_config, _common_init, {"hidden": 256, "layers": 8}),
    "nemotron_h": (_nemotron_h_config, _nemotron_h_init, {"hidden": 256, "layers": 8}),
}


def _fan_in(shape: tuple[int, ...], rng: np.random.Generator, gain: float = 1.0) -> np.ndarray:
    """Normal init with std gain/sqrt(fan_in); mlx Linear weights are (out, in)."""
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    return (rng.standard_normal(shape, dtype=np.float32) * (gain / np.sqrt(fan_in))).astype(np.float32)


def _generic_init(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return np.zeros(shape, np.float32)
    if len(shape) == 1:  # norm scales and similar per-channel gains
        return np.ones(shape, np.float32)
    if "embed" in name:
        # Unit-variance rows: RMSNorm follows, and a strong token identity in
        # the residual stream keeps the model's output token-specific.
        return rng.standard_normal(shape, dtype=np.float32)
    return _fan_in(shape, rng)


def _param_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Parameter names/shapes of the mlx-lm model class for this config."""
    from mlx.utils import tree_flatten

    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))  # params stay lazy: cheap
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def _make_weights(config: dict[str, Any], rule: InitRule, seed: int) -> dict[str, np.ndarray]:
    shapes = _param_shapes(config)
    weights: dict[str, np.ndarray] = {}
    for i, name in enumerate(sorted(shapes)):
        # A per-parameter stream keeps each tensor independent of the others.
        rng = np.random.default_rng([seed, i])
        arr = rule(name, shapes[name], rng, config)
        weights[name] = _generic_init(name, shapes[name], rng) if arr is None else arr
    return weights


# --------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------


def _marker(arch: str, hidden: int, layers: int, seed: int, vocab_size: int) -> dict[str, Any]:
    return {
        "format_version": _FORMAT_VERSION,
        "arch": arch,
        "hidden": hidden,
        "layers": layers,
        "seed": seed,
        "vocab_size": vocab_size,
    }


def _is_complete(path: Path, marker: dict[str, Any]) -> bool:
    try:
        return json.loads((path / _MARKER).read_text()) == marker
    except (OSError, ValueError):
        return False


def _generate(out: Path, arch: str, hidden: int, layers: int, seed: int, vocab_size: int) -> None:
    from safetensors.numpy import save_file

    build_config, rule, _ = _ARCH_SPECS[arch]
    real_vocab, special = _write_tokenizer(out, vocab_size)
    config = build_config(hidden=hidden, layers=layers)
    config.update(
        vocab_size=real_vocab,
        torch_dtype="float32",
        bos_token_id=special[_BOS],
        eos_token_id=[special[_EOS], special[_BOS]],
    )
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(_make_weights(config, rule, seed), str(out / "model.safetensors"), metadata={"format": "mlx"})


def make_model(
    path: str | Path,
    arch: str = "llama",
    *,
    hidden: int | None = None,
    layers: int | None = None,
    seed: int = 0,
    vocab_size: int = 4096,
    overwrite: bool = False,
) -> Path:
    """Write a random-weight model directory for ``arch`` at ``path`` and return it.

    ``hidden``/``layers`` default per architecture (llama: 512/8).  An existing
    directory generated with the same arguments is reused unless ``overwrite``.
    Generation happens in a sibling temp dir renamed into place, so a crash
    never leaves a half-written model behind.
    """
    if arch not in _ARCH_SPECS:
        raise ValueError(f"unknown arch {arch!r}; choose from {ARCHES}")
    defaults = _ARCH_SPECS[arch][2]
    hidden = defaults["hidden"] if hidden is None else hidden
    layers = defaults["layers"] if layers is None else layers
    if hidden <= 0 or hidden % 64:
        raise ValueError(f"hidden must be a positive multiple of 64 (head_dim), got {hidden}")
    if layers < (2 if arch in ("qwen3_next", "nemotron_h") else 1):
        raise ValueError(f"too few layers for {arch}: {layers}")
    path = Path(path)
    marker = _marker(arch, hidden, layers, seed, vocab_size)
    if not overwrite and _is_complete(path, marker):
        return path

    if path.exists() and not overwrite and not (path / _MARKER).exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not a kvtier test model")

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        _generate(tmp, arch, hidden, layers, seed, vocab_size)
        # The marker goes last: its presence means the directory is complete.
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2))
        # Another process may have finished the same model meanwhile: keep
        # theirs rather than pulling the directory from under a reader.
        if overwrite or not _is_complete(path, marker):
            try:
                _replace_dir(tmp, path)
            except OSError:
                if not _is_complete(path, marker):  # lost a race to an equal model: fine
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _replace_dir(src: Path, dst: Path) -> None:
    """Move src to dst, moving any old dst aside first and deleting it after."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
    os.rename(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
