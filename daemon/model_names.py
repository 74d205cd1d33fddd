"""Which model serves a request's `model` name, in one place for every route.

Agents send the names they were built for ("claude-opus-…", "gpt-…"). A name is looked up in
this order, and the requested name is what the response echoes:
1. exact names: a model's name, its aliases without glob characters, its source (path or repo
   id), the source's directory name, and "default" (the first configured model);
2. glob aliases (`claude-*haiku*`, fnmatch): the most specific match (most literal characters)
   wins, so `claude-*haiku*` beats `claude-*` in whatever order they come; then the first
   configured;
3. with `--allow-any-model`, a Hugging Face repo id not configured: a new model, created once
   and kept (from the HF cache, or downloaded by whoever loads it unless `--offline`);
4. the default model, unless `--strict-model-names`, which answers 404 instead.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from pathlib import Path

from kvtier.config import ModelSpec

from .client_names import OncePerName, shown
from .errors import ApiError

log = logging.getLogger("kvtier.models")

# A Hugging Face repo id: "owner/name", no path beyond (what `--allow-any-model` may load).
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]")


def is_glob(name: str) -> bool:
    return any(char in name for char in "*?[")


def is_repo_id(name: str) -> bool:
    return _REPO_ID.fullmatch(name) is not None and ".." not in name


def _literal(glob: str) -> str:
    """A glob's literal characters (without *, ? and [...] classes)."""
    return re.sub(r"\[[^\]]*\]|[*?]", "", glob)


def exact_aliases(spec: ModelSpec) -> list[str]:
    return [alias for alias in spec.aliases if not is_glob(alias)]


# The kinds of exact name, most explicit first: where two models share a name, the more
# explicit kind wins (a name over an alias over a source over a directory name).
_KINDS = (lambda spec: [spec.name], exact_aliases, lambda spec: [spec.source],
          lambda spec: [Path(spec.source).expanduser().name])


class ModelNames:
    def __init__(self, specs: list[ModelSpec], strict: bool = False, allow_any: bool = False,
                 offline: bool = False):
        if not specs:
            raise ValueError("no model configured")
        self.specs = specs  # the configured models; the first is the default
        self.strict, self.allow_any, self.offline = strict, allow_any, offline
        self.found: list[ModelSpec] = []  # models `--allow-any-model` added, in order of first request
        self._logged = OncePerName()

    @property
    def default(self) -> ModelSpec:
        return self.specs[0]

    def _exact(self) -> dict[str, ModelSpec]:
        """Every exact name and its model, the first configured winning among names of one
        kind; computed each time, as aliases may be attached after construction."""
        table = {"default": self.default}
        for kind in _KINDS:
            for spec in self.specs:
                for name in kind(spec):
                    table.setdefault(name, spec)
        for spec in self.found:  # by its repo id only: its directory name stays the default's
            table.setdefault(spec.name, spec)
        table.pop("", None)
        return table

    def known(self) -> set[str]:
        """The exact names (also what `DELETE /cache?model=` accepts)."""
        return set(self._exact())

    def names_of(self, spec: ModelSpec) -> set[str]:
        """The exact names that mean `spec`."""
        return {name for name, owner in self._exact().items() if owner is spec}

    def listed(self) -> list[str]:
        """What `/v1/models` lists: each model's name then its exact aliases, no repeats."""
        names = (name for spec in [*self.specs, *self.found]
                 for name in [spec.name, *exact_aliases(spec)])
        return list(dict.fromkeys(names))

    def spec_named(self, name: str) -> ModelSpec | None:
        """The model an exact name means, or None (no globs, no fallback)."""
        return self._exact().get(name)

    def resolve(self, requested: str) -> tuple[ModelSpec, str]:
        """The model that serves a request for `requested`, and the name to echo (the
        requested one); a 404 in strict mode when nothing matches."""
        spec = self.spec_named(requested)
        if spec is None:
            spec = self._globbed(requested) or self._any_model(requested) or self._fallback(requested)
            if spec.name != requested and self._logged.first_time(requested):
                log.info("requests for model %s are served by %s", shown(requested), spec.name)
        return spec, requested

    def _fallback(self, requested: str) -> ModelSpec:
        if self.strict:
            served = ", ".join(f"'{spec.name}'" for spec in self.specs)
            raise ApiError(404, f"model '{requested}' is not served here; this daemon serves "
                                f"{served} (or use 'default')", param="model", code="model_not_found")
        return self.default

    def _globbed(self, requested: str) -> ModelSpec | None:
        """The model of the most specific glob matching: the most literal characters
        (`claude-*haiku*` over `claude-*`, whichever model comes first), then the first
        configured."""
        matches = [(spec, alias) for spec in self.specs for alias in spec.aliases
                   if is_glob(alias) and fnmatch.fnmatchcase(requested, alias)]
        if not matches:
            return None
        return max(matches, key=lambda match: len(_literal(match[1])))[0]  # max keeps the first of ties

    def _any_model(self, requested: str) -> ModelSpec | None:
        """With `--allow-any-model`, a repo id in the HF cache (or, online, any repo id: whoever
        loads it downloads it) becomes a model of its own, kept for the next request."""
        if not self.allow_any or not is_repo_id(requested):
            return None
        from kvtier.hub import in_hf_cache

        if self.offline and in_hf_cache(requested) is None:
            return None
        spec = ModelSpec(requested)
        self.found.append(spec)
        log.info("model %s is not configured: --allow-any-model serves it", shown(requested))
        return spec

    def forget(self, spec: ModelSpec) -> None:
        """Drop a model `--allow-any-model` added (its download or load failed), so that the
        next request for its name tries again."""
        if spec in self.found:
            self.found.remove(spec)


def parse_alias(text: str, names: ModelNames) -> tuple[str, ModelSpec]:
    """`NAME` (the default model) or `NAME=MODEL` (MODEL: any exact name of a configured
    model) -> the alias and the model it names."""
    alias, _, target = text.partition("=")
    if not alias:
        raise ValueError(f"--model-alias {text!r}: give NAME or NAME=MODEL")
    spec = names.spec_named(target or "default")
    if spec is None:
        served = ", ".join(f"'{spec.name}'" for spec in names.specs)
        raise ValueError(f"--model-alias {text!r}: no model '{target}' is configured (models: {served})")
    return alias, spec
