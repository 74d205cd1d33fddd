"""Which `model` names a request may use, in one place for every route (a stand-in until the
names work lands: exact names, else the default model)."""

from __future__ import annotations

import logging
from pathlib import Path

from kvtier.config import ModelSpec

from .errors import ApiError

log = logging.getLogger("kvtier.models")


class ModelNames:
    def __init__(self, specs: list[ModelSpec], strict: bool = False, allow_any: bool = False,
                 offline: bool = False):
        self.specs, self.strict = specs, strict
        self._logged: set[str] = set()

    def _names(self, spec: ModelSpec) -> set[str]:
        return {spec.name, spec.source, Path(spec.source).name, *spec.aliases}

    def spec_named(self, name: str) -> ModelSpec | None:
        if name == "default":
            return self.specs[0]
        return next((s for s in self.specs if name in self._names(s)), None)

    def known(self) -> set[str]:
        return {"default"} | {n for s in self.specs for n in self._names(s)}

    def listed(self) -> list[str]:
        names = [n for s in self.specs for n in (s.name, *s.aliases)]
        return list(dict.fromkeys(names))

    def resolve(self, requested: str) -> tuple[ModelSpec, str]:
        spec = self.spec_named(requested)
        if spec is not None:
            return spec, requested
        if self.strict:
            raise ApiError(404, f"model '{requested}' is not served here", param="model", code="model_not_found")
        return self.specs[0], requested


def parse_alias(text: str, served: str) -> str:
    name, _, target = text.partition("=")
    if not name:
        raise ValueError(f"--model-alias {text!r}: give NAME or NAME=MODEL")
    return name
