"""The daemon's API as an OpenAPI 3.1 document, served at /openapi.json and fuzzed in tests:
the POST bodies' schemas are generated from the models that check them (POST_BODIES: the
route's model in daemon/bodies_openai.py, bodies_cache.py, bodies_anthropic.py or
bodies_responses.py), so the document says what the routes accept."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .bodies import Body
from .bodies_anthropic import CountTokensRequest, MessagesRequest
from .bodies_cache import PinRequest, WarmRequest
from .bodies_openai import ChatCompletionRequest, CompletionRequest
from .bodies_responses import ResponsesRequest
from .errors import is_anthropic_route

_REFS = "#/components/schemas/{model}"

# Each POST route's body, as its route reads it (read_body); fuzzed by tests/test_fuzz.py.
POST_BODIES: dict[str, type[Body]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/responses": ResponsesRequest,
    "/v1/messages": MessagesRequest,
    "/v1/messages/count_tokens": CountTokensRequest,
    "/cache/warm": WarmRequest,
    "/cache/pin": PinRequest,
    "/cache/unpin": PinRequest,
}

_OPENAI_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
_ANTHROPIC_ERROR = {"type": "object", "required": ["type", "error"], "properties": {
    "type": {"const": "error"}, "error": {"type": "object", "required": ["type", "message"],
                                          "properties": {"type": {"type": "string"},
                                                         "message": {"type": "string"}}}}}

POSTS = {
    "/v1/chat/completions": ("Chat completion (OpenAI)", "the completion"),
    "/v1/completions": ("Text completion (OpenAI)", "the completion"),
    "/v1/responses": ("Response (OpenAI Responses API)", "the response"),
    "/v1/messages": ("Messages (Anthropic)", "the message"),
    "/v1/messages/count_tokens": ("Count prompt tokens (Anthropic)", "the token count"),
    "/cache/warm": ("Prefill a prompt and persist it", "tokens warmed"),
    "/cache/pin": ("Protect a cached prefix's chain from eviction", "entries pinned"),
    "/cache/unpin": ("Let a cached prefix's chain be evicted again", "entries unpinned"),
}
GETS = {
    "/v1/models": "The configured models and their aliases, with each one's state and sizes",
    "/models": "Each model's state, sizes, loads and batching (`kvtier models list`)",
    "/health": "Liveness: 200 once the model is loaded",
    "/cache/stats": "Tiers, budgets and counters",
    "/cache/entries": "Cached prefixes",
    "/metrics": "Prometheus metrics",
    "/openapi.json": "This document",
    "/status": "Requests in flight, tokens by tier and the time saved (the status page's data)",
    "/": "The status page (HTML)",
    "/static/status.js": "The status page's script",
    "/static/status.css": "The status page's style sheet",
}
# POSTs with no body: an operator's action on a model named in the path (`kvtier models`).
ACTIONS = {
    "/models/{name}/load": "Load a model now (unloading idle ones for room)",
    "/models/{name}/unload": "Unload a model now, its hot KV written to disk first (409 while it serves)",
    "/models/{name}/pin": "Load a model and keep it loaded",
    "/models/{name}/unpin": "Let a model be unloaded again (for room or by the keep-alive)",
}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
         "description": "a model's name, alias, source, directory name, or default"}
_MODEL = {"get": {"summary": "One model as /v1/models lists it (OpenAI's retrieve model)", "parameters": [
    {"name": "model", "in": "path", "required": True, "schema": {"type": "string"},
     "description": "a name /v1/models lists"}],
    "responses": {"200": {"description": "the model"},
                  "404": {"description": "not listed", "content": {"application/json": {"schema": _OPENAI_ERROR}}}}}}
_PURGE = {"delete": {"summary": "Purge cached entries", "parameters": [
    {"name": name, "in": "query", "schema": {"type": "string"}}
    for name in ("all", "model", "older_than", "to_size")],
    "responses": {"200": {"description": "what was removed"}}}}


def _json(schema: dict) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


def _post(path: str, schema: dict) -> dict:
    summary, ok = POSTS[path]
    error = _ANTHROPIC_ERROR if is_anthropic_route(path) else _OPENAI_ERROR
    return {"post": {"summary": summary, "requestBody": dict(_json(schema), required=True),
                     "responses": {"200": {"description": ok},
                                   "4XX": dict(_json(error), description="bad request")}}}


def _action(summary: str) -> dict:
    return {"post": {"summary": summary, "parameters": [_NAME],
                     "responses": {"200": {"description": "the model, as GET /models shows it"},
                                   "4XX": dict(_json(_OPENAI_ERROR), description="unknown model (404), busy (409)")}}}


def document() -> dict:
    components: dict[str, Any] = {}
    paths: dict[str, Any] = {}
    for path, model in POST_BODIES.items():
        schema = model.model_json_schema(ref_template=_REFS)
        components.update(schema.pop("$defs", {}))  # shared by routes: one name, one schema
        paths[path] = _post(path, schema)
    paths.update({path: {"get": {"summary": summary, "responses": {"200": {"description": summary}}}}
                  for path, summary in GETS.items()})
    paths.update({path: _action(summary) for path, summary in ACTIONS.items()})
    paths["/cache"] = _PURGE
    paths["/v1/models/{model}"] = _MODEL
    return {
        "openapi": "3.1.0",
        "info": {"title": "kvtier", "version": "0.1.0",
                 "description": "Tiered RAM/SSD KV-cache daemon for MLX: OpenAI- and Anthropic-compatible."},
        "paths": paths,
        "components": {"schemas": components},
    }


routes = web.RouteTableDef()


@routes.get("/openapi.json")
async def openapi(_: web.Request) -> web.Response:
    return web.json_response(document())
