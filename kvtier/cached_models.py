"""Which cached model a `purge --model` selector names, from the index's `models` table
(fingerprint -> the description an Engine registers: name, path, and where the daemon gives
them, source and aliases) and the per-model totals.

Looked up in order: a whole fingerprint, a recorded name, source, alias or model path; then
a name's or source's directory name; then the start of the fingerprint of a model holding
entries. One model may have several fingerprints (one per mlx / mlx-lm): a selector naming
one model names all of them; one naming two different models is refused, listing them."""

from __future__ import annotations

from pathlib import Path


class UnknownModel(ValueError):
    """`--model` names no model the cache holds, or more than one."""


def _label(description: dict) -> str:
    return str(description.get("name") or description.get("source") or "?")


def _exact_names(fingerprint: str, description: dict) -> set[str]:
    names = {fingerprint, description.get("name"), description.get("source"), description.get("path")}
    aliases = description.get("aliases")
    if isinstance(aliases, list):
        names |= set(aliases)
    return {name for name in names if isinstance(name, str) and name}


def _directory_names(description: dict) -> set[str]:
    # The model path's own directory name is not one: a hub snapshot's is a commit hash.
    given = (description.get("name"), description.get("source"))
    return {Path(name).name for name in given if isinstance(name, str) and name}


def select(models: dict[str, dict], counted: set[str], holding: set[str], selector: str) -> set[str]:
    """The fingerprints `selector` names (UnknownModel for none, or more than one model).
    `models`: the index's table; `counted`: the fingerprints with totals; `holding`: those
    with entries."""
    every = set(models) | counted
    as_path = str(Path(selector).expanduser().resolve()) if Path(selector).expanduser().exists() else None
    for matches in (
        {fp for fp in every if {selector, as_path} & _exact_names(fp, models.get(fp, {}))},
        {fp for fp in every if selector in _directory_names(models.get(fp, {}))},
    ):
        if matches:
            return _one_model(matches, models, holding, selector)
    by_start = {fp for fp in holding if fp.startswith(selector)}
    if not by_start:
        raise UnknownModel(f"no cached model is named {selector!r} or has a fingerprint starting with it "
                           f"(see `kvtier stats`)")
    if len(by_start) > 1:  # a fingerprint's start stands for one fingerprint
        raise _ambiguous(by_start, models, f"{selector!r} starts more than one model's fingerprint")
    return by_start


def _one_model(fingerprints: set[str], models: dict[str, dict], holding: set[str], selector: str) -> set[str]:
    """The fingerprints of one model (one recorded name) among `fingerprints`: of the one
    model holding entries, when others hold none; else UnknownModel."""
    relevant = (fingerprints & holding) or fingerprints
    labels = {_label(models.get(fp, {})) for fp in relevant}
    if len(labels) > 1 or (len(relevant) > 1 and labels == {"?"}):
        raise _ambiguous(relevant, models, f"{selector!r} names more than one model")
    return {fp for fp in fingerprints if _label(models.get(fp, {})) in labels}


def _ambiguous(fingerprints: set[str], models: dict[str, dict], what: str) -> UnknownModel:
    shown = ", ".join(sorted(f"{_label(models.get(fp, {}))} [{fp[:12]}]" for fp in fingerprints))
    return UnknownModel(f"{what} ({shown}): give its full name or more of its fingerprint")
