"""Which `model` names a request may use, in one place for every route.

The daemon serves one model. Agents send the names they were built for ("claude-opus-…",
"gpt-…"), so by default any name is answered by the served model: the name is echoed back in
the response and the mapping logged once per name. `--strict-model-names` refuses every name
except the served model's own ("default", the `--model` value, its directory name) and its
`--model-alias` names.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import ApiError

log = logging.getLogger("kvtier.models")


class ModelNames:
    def __init__(self, served: str, aliases: list[str] | None = None, strict: bool = False):
        self.served, self.strict = served, strict
        self.aliases = list(dict.fromkeys(aliases or []))
        self._own = {served, Path(served).name, "default"}
        self._logged: set[str] = set()

    def known(self) -> set[str]:
        """Names that always mean the served model (also what `DELETE /cache?model=` accepts)."""
        return self._own | set(self.aliases)

    def listed(self) -> list[str]:
        """What `/v1/models` lists: the served model, then its aliases."""
        return [self.served, *(a for a in self.aliases if a != self.served)]

    def resolve(self, requested: str) -> str:
        """The name to echo back for a request that asked for `requested`, or a 404."""
        if requested in self.known():
            return requested
        if self.strict:
            raise ApiError(404, f"model '{requested}' is not served here; this daemon serves "
                                f"'{self.served}' (or use 'default')", param="model",
                           code="model_not_found")
        if requested not in self._logged:
            self._logged.add(requested)
            log.info("requests for model '%s' are served by %s", requested, self.served)
        return requested


def parse_alias(text: str, served: str) -> str:
    """`NAME` or `NAME=MODEL` (MODEL naming the served model) -> NAME."""
    name, _, target = text.partition("=")
    if not name:
        raise ValueError(f"--model-alias {text!r}: give NAME or NAME=MODEL")
    if target and target not in {served, Path(served).name, "default"}:
        raise ValueError(f"--model-alias {text!r}: this daemon serves only '{served}'")
    return name
