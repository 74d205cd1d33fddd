"""The models `kvtier serve` is given: `--model [NAME=]SOURCE` flags and a `--models-file`.

A models file is TOML:

    default = "coder"            # optional: this model is the default (listed first)
    [[models]]
    source = "mlx-community/Qwen3-Coder-30B-A3B-Instruct-4bit"   # a directory or a repo id
    name = "coder"               # optional; default: the source
    aliases = ["claude-*"]       # optional; fnmatch globs allowed
    max_context = 65536          # optional, per model: max_context, kv_bits, kv_group_size, pin

A relative `source` that exists beside the file is taken from there. Any other key, or a
value of the wrong kind, is refused naming the file and the key.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

from kvtier.config import ModelSpec

from .model_names import ModelNames, is_glob, is_repo_id, parse_alias

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - 3.10
    import tomli as tomllib


def parse_model_flag(text: str) -> ModelSpec:
    """`--model SOURCE` or `--model NAME=SOURCE`. A path may hold '=': the text is split only
    where the part before '=' has no '/', the whole text is no existing path, and the part
    after is an existing path, looks like one (/, ~, .) or is a repo id."""
    name, sep, source = text.partition("=")
    if sep and name and "/" not in name and not Path(text).expanduser().exists() and _is_source(source):
        return ModelSpec(source, name=name)
    if not text:
        raise ValueError("--model needs a model directory or a Hugging Face repo id")
    return ModelSpec(text)


def _is_source(text: str) -> bool:
    return text.startswith(("/", "~", ".")) or Path(text).exists() or is_repo_id(text)


def _positive(value: Any) -> bool:
    return type(value) is int and value > 0


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


# key -> (the check of its value, what the check wants)
_MODEL_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "source": (lambda v: isinstance(v, str) and bool(v), "a model directory or a repo id"),
    "name": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "aliases": (_names, "a list of names"),
    "max_context": (_positive, "a positive whole number of tokens"),
    "kv_bits": (lambda v: type(v) is int and v in (2, 3, 4, 5, 6, 8), "one of 2, 3, 4, 5, 6, 8"),
    "kv_group_size": (_positive, "a positive whole number"),
    "pin": (lambda v: isinstance(v, bool), "true or false"),
}
_TOP_KEYS = ("default", "models")


def read_models_file(path: str | Path) -> tuple[list[ModelSpec], str | None]:
    """The models a file lists, in its order, and the name its `default` gives (ValueError,
    one line naming the file and the key, for anything wrong)."""
    where = f"models file {path}"
    try:
        data = tomllib.loads(Path(path).expanduser().read_text())
    except OSError as exc:
        raise ValueError(f"cannot read the {where}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where} is not valid TOML: {exc}") from None
    for key in data:
        if key not in _TOP_KEYS:
            raise ValueError(f"{where}: unknown key '{key}' (known: {', '.join(_TOP_KEYS)})")
    default = data.get("default")
    if default is not None and not (isinstance(default, str) and default):
        raise ValueError(f"{where}: 'default' must be a model's name")
    tables = data.get("models", [])
    if not (isinstance(tables, list) and all(isinstance(t, dict) for t in tables)):
        raise ValueError(f"{where}: 'models' must be [[models]] tables")
    base = Path(path).expanduser().resolve().parent
    return [_model(table, f"{where}: [[models]] #{n}", base) for n, table in enumerate(tables, 1)], default


def _model(table: dict[str, Any], where: str, base: Path) -> ModelSpec:
    for key, value in table.items():
        if key not in _MODEL_KEYS:
            raise ValueError(f"{where}: unknown key '{key}' (known: {', '.join(_MODEL_KEYS)})")
        valid, wanted = _MODEL_KEYS[key]
        if not valid(value):
            raise ValueError(f"{where}: '{key}' must be {wanted}, not {value!r}")
    if "source" not in table:
        raise ValueError(f"{where}: 'source' is missing (a model directory or a repo id)")
    beside = base / table["source"]
    source = str(beside) if not Path(table["source"]).expanduser().is_absolute() and beside.exists() \
        else table["source"]
    return ModelSpec(**dict(table, source=source, aliases=list(table.get("aliases", []))))


def configured_models(flags: list[str], models_file: str | None, aliases: list[str] | None = None
                      ) -> list[ModelSpec]:
    """Every model, the default first: the `--model` flags in order, then the file's models;
    the file's `default` names the default among them all. Then the `--model-alias` flags."""
    specs = _listed_models(flags, models_file)
    names = ModelNames(specs)
    for text in aliases or []:
        alias, spec = parse_alias(text, names)
        spec.aliases.append(alias)
    check_unique_names(specs)
    return specs


def _listed_models(flags: list[str], models_file: str | None) -> list[ModelSpec]:
    specs = [parse_model_flag(text) for text in flags]
    default = None
    if models_file is not None:
        listed, default = read_models_file(models_file)
        specs += listed
    if not specs:
        where = f" (the models file {models_file} lists none)" if models_file else ""
        raise ValueError(f"give a model: --model PATH_OR_REPO or --models-file FILE{where}")
    if default is not None:
        chosen = [spec for spec in specs if spec.name == default]
        if not chosen:
            raise ValueError(f"models file {models_file}: 'default' names no model: '{default}' "
                             f"(models: {', '.join(spec.name for spec in specs)})")
        specs.remove(chosen[0])
        specs.insert(0, chosen[0])
    return specs


def check_unique_names(specs: list[ModelSpec]) -> None:
    """A model's name or exact alias may name one model only (globs may overlap: the first
    configured match wins)."""
    owner: dict[str, ModelSpec] = {}
    for spec in specs:
        for name in dict.fromkeys([spec.name, *(a for a in spec.aliases if not is_glob(a))]):
            other = owner.setdefault(name, spec)
            if other is not spec:
                raise ValueError(f"the name '{name}' is given to two models: {other.source} and {spec.source}")
