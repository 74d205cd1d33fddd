"""pydantic's validation errors as the API's 400: the field that is wrong, by its path in
the body the client sent, and what it should have been."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from .errors import InvalidField

_KINDS = {"string_type": "a string", "int_type": "an integer", "float_type": "a number",
          "bool_type": "a boolean", "list_type": "an array", "dict_type": "an object",
          "model_type": "an object", "model_attributes_type": "an object",
          "union_tag_not_found": "an object", "literal_error": None, "none_required": "null"}


def invalid_field(exc: ValidationError, body: dict) -> InvalidField:
    """The deepest error pydantic found (the most precise), with its path in the body; where
    a union's members all refused the value, what each would have accepted."""
    found = [(_path_in(body, error["loc"], error["type"] == "missing"), error) for error in exc.errors(include_url=False)]
    deepest = max(len(path) for path, _ in found)
    here = [(path, error) for path, error in found if len(path) == deepest]
    path, first = here[0]
    kinds = [kind for at, error in here if at == path and (kind := _KINDS.get(error["type"]))]
    # A union member whose type the value has, refusing it on a constraint, says what is wrong.
    fitted = [error for at, error in here if at == path and error["type"] not in _KINDS]
    if first["type"] == "missing":
        detail = "Field required"
    elif fitted:
        detail = fitted[0]["msg"]
    elif len(kinds) > 1:
        detail = "must be " + " or ".join(dict.fromkeys(kinds))
    else:
        detail = first["msg"]
    return InvalidField(path, detail, missing=first["type"] == "missing")


def _path_in(body: Any, loc: tuple, missing: bool) -> tuple:
    """`loc` without the union members' tags pydantic puts in it: the keys that are really
    in the body, and a missing field's name at the end."""
    path, value = [], body
    for key in loc:
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, list) and isinstance(key, int) and 0 <= key < len(value):
            value = value[key]
        else:
            continue  # a tag
        path.append(key)
    if missing:
        path.append(loc[-1])
    return tuple(path)
