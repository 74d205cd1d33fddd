"""`kvtier models [list | load NAME | unload NAME | pin NAME | unpin NAME]`: the models of a
running daemon, over its HTTP API (GET /models, POST /models/NAME/ACTION). Exit 1 when the
daemon refuses (an unknown model, a busy one), 2 when no daemon (or not kvtier) answers at --url."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from kvtier.config import format_size

COMMAND = "models"
ACTIONS = ("list", "load", "unload", "pin", "unpin")
DEFAULT_URL = "http://127.0.0.1:8420"
LOAD_TIMEOUT = 3600.0  # a large model's load from a slow disk; the daemon answers when it is done


class NotRunning(Exception):
    """Nothing answers at the daemon's URL."""


class NotADaemon(Exception):
    """Something answers at the URL, but not as kvtier's models API."""


# What the table and the summary read of each model.
MODEL_FIELDS = ("name", "state", "weight_bytes", "hot_bytes", "loads", "load_seconds")


def add_parser(commands) -> None:
    models = commands.add_parser(COMMAND, help="list, load, unload, pin or unpin the models of a running daemon")
    models.add_argument("action", nargs="?", choices=ACTIONS, default="list", help="default: list")
    models.add_argument("name", nargs="?", help="the model: its name, an alias, its path or repo id, or default")
    models.add_argument("--url", default=os.environ.get("KVTIER_URL", DEFAULT_URL),
                        help=f"the daemon's address, with or without its /v1 (default: $KVTIER_URL "
                             f"or {DEFAULT_URL})")
    models.add_argument("--api-key", default=None, help="the daemon's --api-key (default: $KVTIER_API_KEY)")
    models.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    if args.action != "list" and not args.name:
        return _fail(f"kvtier models {args.action}: give the model's name (see `kvtier models list`)")
    key = args.api_key or os.environ.get("KVTIER_API_KEY") or None
    url = base_url(args.url)
    try:
        if args.action == "list":
            models = _models_list(_call(url, "GET", "/models", key))
            print(json.dumps(models, indent=2) if args.json else table(models))
            return 0
        path = f"/models/{urllib.parse.quote(args.name, safe='')}/{args.action}"
        model = _model(_call(url, "POST", path, key))
    except NotRunning as exc:
        print(f"kvtier: no daemon is running at {args.url} ({exc})", file=sys.stderr)
        return 2
    except NotADaemon as exc:
        print(f"kvtier: {args.url} does not answer as a kvtier daemon ({exc})", file=sys.stderr)
        return 2
    except ValueError as exc:  # the daemon's refusal
        return _fail(f"kvtier models {args.action}: {exc}")
    print(json.dumps(model, indent=2) if args.json else summary(model))
    return 0


def base_url(url: str) -> str:
    """The daemon's root: an OpenAI base URL (.../v1, as OPENAI_BASE_URL has it) names it too."""
    return url.rstrip("/").removesuffix("/v1")


def _models_list(answer: Any) -> list[dict]:
    models = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(models, list):
        raise NotADaemon("GET /models gave no list of models")
    return [_model(model) for model in models]


def _model(answer: Any) -> dict:
    missing = [f for f in MODEL_FIELDS if f not in answer] if isinstance(answer, dict) else ["all"]
    if missing:  # an OpenAI /v1/models entry, say: {"id": ..., "object": "model"}
        raise NotADaemon(f"a model without {', '.join(missing)}")
    return answer


def _call(url: str, method: str, path: str, key: str | None) -> Any:
    """The daemon's JSON answer; ValueError with its error message, NotRunning if none answers,
    NotADaemon if what answers is not JSON."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(url.rstrip("/") + path, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=LOAD_TIMEOUT) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        raise ValueError(_error_message(exc)) from None
    except urllib.error.URLError as exc:
        raise NotRunning(str(getattr(exc.reason, "strerror", None) or exc.reason)) from None
    except (ConnectionError, TimeoutError) as exc:
        raise NotRunning(str(exc)) from None
    try:
        return json.loads(body)
    except ValueError:
        raise NotADaemon(f"{method} {path} did not answer JSON") from None


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        message = json.loads(exc.read())["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = exc.reason
    return f"{message} (HTTP {exc.code})"


def table(models: list[dict]) -> str:
    """One line per model: name, state, weights, hot KV, loads, the last load's seconds."""
    rows = [("NAME", "STATE", "WEIGHTS", "HOT KV", "LOADS", "LAST LOAD")]
    for m in models:
        rows.append((m["name"] + (" (default)" if m.get("default") else ""), _state(m),
                     format_size(m["weight_bytes"]), format_size(m["hot_bytes"]), str(m["loads"]),
                     f"{m['load_seconds']:.1f} s" if m["load_seconds"] is not None else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines += [f"{m['name']}: {m['error']}" for m in models if m.get("error")]
    return "\n".join(lines)


def summary(model: dict) -> str:
    """What an action left the model as, on one line."""
    loaded = f", loaded in {model['load_seconds']:.1f} s" if model["load_seconds"] is not None else ""
    return (f"{model['name']}: {_state(model)} (weights {format_size(model['weight_bytes'])}, "
            f"hot KV {format_size(model['hot_bytes'])}{loaded})")


def _state(model: dict) -> str:
    state = model["state"] + (f" ({model['phase']})" if model.get("phase") else "")
    return state + (", pinned" if model.get("pinned") else "")


def _fail(message: str) -> int:
    print(message, file=sys.stderr)
    return 1
