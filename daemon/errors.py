"""API errors in OpenAI's shape, and the checks that raise them for request bodies."""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web


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


def error_response(error: ApiError) -> web.Response:
    return web.json_response(error.body(), status=error.status, headers=error.headers)


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
        return error_response(ApiError(exc.status, exc.reason, type_=kind))
    except Exception:  # a bug: still answer in the API's shape, and log it loudly
        logging.getLogger("kvtier.daemon").exception("unhandled error on %s", request.path)
        return error_response(ApiError(500, "internal error (see the daemon log)", type_="server_error"))


async def json_body(request: web.Request) -> dict:
    try:
        body = await request.json(loads=json.loads)
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, "request body too large") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


_TYPES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean",
          list: "an array", dict: "an object"}


def field(body: dict, name: str, kind: type, default: Any = None, required: bool = False,
          minimum: float | None = None, maximum: float | None = None) -> Any:
    """Read one field, checking type and range; bool is never accepted as a number."""
    if name not in body or body[name] is None:
        if required:
            raise ApiError(400, f"missing required parameter: '{name}'", param=name)
        return default
    value = body[name]
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ApiError(400, f"'{name}' must be {_TYPES[kind]}", param=name)
    if minimum is not None and value < minimum:
        raise ApiError(400, f"'{name}' must be >= {minimum}", param=name)
    if maximum is not None and value > maximum:
        raise ApiError(400, f"'{name}' must be <= {maximum}", param=name)
    return value
