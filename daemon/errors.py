"""API errors, the one place that shapes them (OpenAI's or Anthropic's, by route)."""

from __future__ import annotations

import logging

from aiohttp import web
from jinja2 import TemplateError, TemplateSyntaxError

log = logging.getLogger("kvtier.daemon")

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
