"""API errors, the one place that shapes them (OpenAI's or Anthropic's, by route), and the
strict JSON reading of request bodies (their fields are checked by daemon/request_models.py)."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from aiohttp import web
from jinja2 import TemplateError, TemplateSyntaxError

from .read_timeout import BodyTimeout, read_body

log = logging.getLogger("kvtier.daemon")

# Deeper bodies are refused before anything recurses over them (the chat template, tool
# schemas); real requests, tool schemas included, nest a few dozen levels at most.
MAX_JSON_DEPTH = 64

# What a client is told of a failure of ours: the details go to the daemon log only.
INTERNAL_ERROR = "internal error (see the daemon log)"

_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                    403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                    429: "rate_limit_error", 500: "api_error", 503: "overloaded_error",
                    529: "overloaded_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type, self.code, self.headers = type_, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}

    def anthropic_message(self) -> str:
        if self.param and self.param not in self.message:
            return f"{self.param}: {self.message}"
        return self.message


class InvalidField(ApiError):
    """A request body field that is wrong, at `path` (its keys and indexes): OpenAI's error
    names it as `param` messages[0].content, Anthropic's message as messages.0.content."""

    def __init__(self, path: tuple, detail: str, missing: bool = False):
        param = "".join(f"[{key}]" if isinstance(key, int) else f".{key}" for key in path).lstrip(".")
        if missing:
            message = f"missing required parameter: '{param}'"
        else:
            message = f"invalid '{param}': {detail}" if param else detail
        super().__init__(400, message, param=param or None)
        self.path, self.detail = path, detail

    def anthropic_message(self) -> str:
        where = ".".join(map(str, self.path))
        return f"{where}: {self.detail}" if where else self.detail


def is_anthropic_route(path: str) -> bool:
    return path.startswith("/v1/messages")


def anthropic_body(status: int, message: str) -> dict:
    kind = _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def _anthropic_response(error: ApiError) -> web.Response:
    status = 529 if error.code == "overloaded" else error.status  # Anthropic's "queue full"
    return web.json_response(anthropic_body(status, error.anthropic_message()), status=status,
                             headers=error.headers)


def error_response(path: str, error: ApiError) -> web.Response:
    """The error as the client of this route expects it: Anthropic's shape on /v1/messages*,
    OpenAI's everywhere else."""
    if is_anthropic_route(path):
        return _anthropic_response(error)
    return web.json_response(error.body(), status=error.status, headers=error.headers)


def unrouted_error_body(status: int, message: str) -> dict:
    """For a request too malformed to have a route: both OpenAI's and Anthropic's SDKs read it."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"type": "error", "error": {"message": message, "type": kind, "param": None, "code": None}}


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except ApiError as exc:
        response = error_response(request.path, exc)
        if exc.status == 408:  # the rest of the body may yet come: the framing is lost
            response.force_close()
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
        return error_response(request.path, ApiError(exc.status, exc.reason, type_=kind))
    except ConnectionResetError:
        raise  # the client is gone: there is no one to answer
    except Exception as exc:
        if isinstance(exc, TemplateError) and not isinstance(exc, TemplateSyntaxError):
            # The model's chat template refuses these messages (its raise_exception), e.g.
            # roles that do not alternate: the request's fault, in the template's words.
            return error_response(request.path, ApiError(
                400, f"the model's chat template cannot render these messages: {exc}", param="messages"))
        # A bug: still answer in the API's shape, and log it loudly.
        log.exception("unhandled error on %s", request.path)
        return error_response(request.path, ApiError(500, INTERNAL_ERROR,
                                                     type_="server_error"))


# -- request bodies ---------------------------------------------------------------------
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
