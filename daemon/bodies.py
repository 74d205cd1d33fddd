"""What every POST route's body shares: `Body` (the pydantic model each body is), `read_body`
and `validate` (a request's body checked as its model, or the API's 400 naming the wrong
field), the field types the APIs have in common and the helpers their models are built with.
The bodies themselves: daemon/bodies_openai.py (Chat Completions, legacy completions),
bodies_cache.py, bodies_anthropic.py (Messages), bodies_responses.py (Responses); which route
reads which, daemon/openapi.py (POST_BODIES).

One declaration gives the checks (types, ranges, required fields, enums, message and
content-part unions), the path of what is wrong (for the API's error body) and the schemas
of /openapi.json. Unknown fields are ignored (clients send many); a top-level null means
"not given", as OpenAI's and Anthropic's servers read it. What only the routes can check (a
prompt's token count against the context, whether a turn may be empty) stays in the routes."""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Discriminator, Field, ValidationError, WrapValidator
from pydantic_core import PydanticCustomError

from .errors import ApiError
from .strict_json import json_body, parse_json
from .validation_errors import invalid_field

MAX_SEED = 2**64 - 1  # mx.random.seed takes an unsigned 64-bit integer

Positive = Annotated[int, Field(ge=1)]
Unit = Annotated[float, Field(ge=0, le=1)]
NonEmpty = Annotated[str, Field(min_length=1)]
JsonObject = dict[str, Any]


class Body(BaseModel):
    # strict: "10" is not an integer and true is not a number (an integer is a number).
    model_config = ConfigDict(strict=True, extra="ignore")


M = TypeVar("M", bound=Body)
T = TypeVar("T")


async def read_body(http: web.Request, model: type[M]) -> M:
    """The request's body: strict JSON (strict_json.json_body), then checked as `model`."""
    return validate(model, await json_body(http))


def validate(model: type[M], body: dict) -> M:
    """The body as `model`, or the API's 400 naming the field that is wrong."""
    given = {key: value for key, value in body.items() if value is not None}
    try:
        return model.model_validate(given)
    except ValidationError as exc:
        raise invalid_field(exc, given) from None


def _keep_as_sent(value: Any, handler: Any) -> Any:
    handler(value)
    return value


# Checked as T, but kept as the client sent it: what goes into the chat template verbatim
# (tool schemas, in the client's key order) must not be re-serialized.
Sent = Annotated[T, WrapValidator(_keep_as_sent)]


def by_type(known: set[str], default: str | None = None, other: str = "other"):
    """A discriminator: an object's `type` (or `default` without one) when known, else `other`."""
    def kind(value: Any) -> str | None:
        if isinstance(value, BaseModel):
            return getattr(value, "type", None)
        if not isinstance(value, dict):
            return None
        tag = value.get("type", default)
        return tag if isinstance(tag, str) and tag in known else other  # a list or object: no known type
    return Discriminator(kind, custom_error_type="object_type",
                         custom_error_message="must be an object with a 'type'")


def refuse(message: str) -> PydanticCustomError:
    """A value this server does not serve, refused with the reason the API's error gives."""
    return PydanticCustomError("unsupported", message)


def among_tools(choice: Any, named: str | None, names: set[str]) -> Any:
    """As OpenAI's API: "required" needs tools, a named function must be one of them."""
    if choice == "required" and not names:
        raise refuse("'required' needs 'tools'")
    if named is not None and named not in names:
        raise refuse(f"no function named '{named}' in 'tools'")
    return choice


def strict_json(text: str, what: str, message: str | None = None) -> Any:
    """JSON inside a string field, read as strictly as the body (strict_json.parse_json)."""
    try:
        return parse_json(text, what)
    except ApiError as exc:
        raise PydanticCustomError("json_invalid", message or exc.message) from None
