"""Strict reading of JSON request bodies, and of JSON a client sends inside a string (tool
call arguments): the body's fields are then checked by the route's model (daemon/bodies.py)."""

from __future__ import annotations

import json
import math
from typing import Any

from aiohttp import web

from .errors import ApiError
from .read_timeout import BodyTimeout, read_body

# Deeper bodies are refused before anything recurses over them (the chat template, tool
# schemas); real requests, tool schemas included, nest a few dozen levels at most.
MAX_JSON_DEPTH = 64


async def json_body(request: web.Request) -> dict:
    try:
        raw = await read_body(request)
    except BodyTimeout as exc:
        raise ApiError(408, str(exc)) from None
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, "request body too large") from None
    except web.RequestPayloadError:  # e.g. broken gzip or chunking, found after the headers
        raise ApiError(400, "could not read the request body: its Content-Encoding or "
                            "Transfer-Encoding is broken") from None
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def parse_json(raw: bytes | str, what: str = "request body", param: str | None = None) -> Any:
    """Strict JSON (RFC 8259): UTF-8 whatever the declared charset, finite numbers only (no
    NaN/Infinity, no 1e400), nested at most MAX_JSON_DEPTH deep, and strings that are valid
    Unicode: a "\\ud800" escape decodes to a lone surrogate that no tokenizer can encode.
    For the body, and for JSON a client sends inside a string (tool call arguments)."""
    try:
        value = _strict_loads(raw)
        bad = _bad_string_path(value, 1)
    except _Invalid as exc:
        raise ApiError(400, f"{what} {exc}", param=param) from None
    if bad is not None:
        inner = ".".join(map(str, reversed(bad)))
        raise ApiError(400, "strings must be valid Unicode: a \\ud800-\\udfff escape must be half "
                            "of a surrogate pair", param=".".join(p for p in (param, inner) if p) or None)
    return value


class _Invalid(Exception):
    """Why a JSON text is refused; parse_json adds whose text it was."""


_TOO_DEEP = f"is nested more than {MAX_JSON_DEPTH} levels deep"


def _strict_loads(raw: bytes | str) -> Any:
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except UnicodeDecodeError:
        raise _Invalid("is not valid UTF-8") from None
    except RecursionError:
        raise _Invalid(_TOO_DEEP) from None
    except json.JSONDecodeError as exc:
        raise _Invalid(f"is not valid JSON: {exc}") from None
    except ValueError:  # Python reads integers of at most 4300 digits
        raise _Invalid("has an integer too long to read") from None


def _reject_constant(name: str) -> float:
    raise _Invalid(f"is not valid JSON: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Invalid(f"has a number out of range: {text[:40]}")
    return value


def _bad_string_path(value: Any, depth: int) -> list | None:
    """The keys (innermost first) to the first string that cannot be UTF-8 encoded; raises
    past MAX_JSON_DEPTH, so nothing later recurses deeper. Leaves are checked inline: this
    walks every value of bodies up to 32 MiB."""
    if isinstance(value, str):
        return None if _is_unicode(value) else []
    if not isinstance(value, (dict, list)):
        return None
    if depth > MAX_JSON_DEPTH:
        raise _Invalid(_TOO_DEEP)
    for key, item in value.items() if isinstance(value, dict) else enumerate(value):
        if isinstance(key, str) and not _is_unicode(key):
            return []  # the object holding the key: the key itself cannot be echoed
        if isinstance(item, str):
            if not _is_unicode(item):
                return [key]
        elif isinstance(item, (dict, list)):
            bad = _bad_string_path(item, depth + 1)
            if bad is not None:
                bad.append(key)
                return bad
    return None


def _is_unicode(text: str) -> bool:
    if text.isascii():  # constant time in CPython
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
