"""Models named by a Hugging Face repo id: from the local HF cache, or downloaded on first use
with a progress bar, as mlx-lm does (`HF_ENDPOINT` picks a mirror; `offline` forbids it)."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("kvtier.hub")

# The files mlx-lm fetches for a model (mlx_lm.utils): weights, configs, tokenizer, template.
MODEL_FILES = ["*.json", "model*.safetensors", "*.py", "tokenizer.model", "*.tiktoken",
               "tiktoken.model", "*.txt", "*.jsonl", "*.jinja"]


class ModelUnavailable(ValueError):
    """Not a directory, not in the HF cache, and not downloadable (offline, unknown, network)."""


def cached_model(model: str) -> Path | None:
    """A local directory, or the snapshot of a repo id already in the HF cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    return in_hf_cache(model)


def in_hf_cache(repo_id: str) -> Path | None:
    """The snapshot of a repo id already in the HF cache (never a directory of that name)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=MODEL_FILES))
    except Exception:  # not cached (LocalEntryNotFoundError), or not a valid repo id
        return None


def fetch_model(model: str, offline: bool = False) -> Path:
    """The model's local path, downloading it into the HF cache when it is not there; a
    directory without a readable config.json naming its model_type is refused at once."""
    found = cached_model(model)
    if found is not None:
        return check_model_dir(found, model)
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelUnavailable(f"no model directory at {model!r}")
    if offline:
        raise ModelUnavailable(f"model {model!r} is not a directory nor in the Hugging Face cache, "
                               "and --offline forbids downloading it")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    log.info("downloading %s from %s into the Hugging Face cache", model, constants.ENDPOINT)
    try:
        return check_model_dir(Path(snapshot_download(model, allow_patterns=MODEL_FILES)), model)
    except RepositoryNotFoundError:
        raise ModelUnavailable(f"no model {model!r} on {constants.ENDPOINT} (or it needs a token)") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelUnavailable(f"could not download {model!r}: {type(exc).__name__}: {exc}") from None


def check_model_dir(path: Path, model: str) -> Path:
    """`path`, if it looks like a model mlx-lm can load: its config.json is a JSON object with
    a model_type (what mlx-lm picks the architecture by). The weights are checked by loading."""
    import json

    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise ModelUnavailable(f"{model!r} is not a model: {path} has no config.json") from None
    except OSError as exc:
        raise ModelUnavailable(f"cannot read {path / 'config.json'}: {exc.strerror}") from None
    except ValueError as exc:
        raise ModelUnavailable(f"{model!r} is not a model: its config.json is not JSON ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelUnavailable(f"{model!r} is not a model: its config.json names no model_type")
    return path
