"""The daemon's API as an OpenAPI 3.1 document, served at /openapi.json and fuzzed in tests."""

from __future__ import annotations

from aiohttp import web

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}

_CHAT_MESSAGE = {"type": "object", "required": ["role"], "properties": {
    "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
    "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}},
                          {"type": "null"}]},
    "tool_calls": {"type": "array", "items": {"type": "object"}},
    "tool_call_id": {"type": "string"}, "name": {"type": "string"}}}

_SAMPLING = {
    "model": {"type": "string"},
    "max_tokens": {"type": "integer", "minimum": 1},
    "max_completion_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1},
    "seed": {"type": "integer", "minimum": 0, "maximum": 2**64 - 1},
    "n": {"type": "integer", "enum": [1]},
    "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}]},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
}

_ANTHROPIC_MESSAGES = {"type": "object", "required": ["model", "messages", "max_tokens"], "properties": {
    "model": {"type": "string"}, "max_tokens": {"type": "integer", "minimum": 1},
    "messages": {"type": "array", "items": {"type": "object", "required": ["role", "content"]}},
    "system": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]},
    "tools": {"type": "array", "items": {"type": "object"}},
    "stop_sequences": {"type": "array", "items": {"type": "string"}},
    "temperature": {"type": "number", "minimum": 0, "maximum": 1},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1}, "top_k": {"type": "integer", "minimum": 0},
    "tool_choice": {"type": "object"}, "metadata": {"type": "object"},
    "stream": {"type": "boolean"}}}


def _json(schema: dict) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


def _post(summary: str, body: dict, ok: str = "the completion") -> dict:
    return {"post": {"summary": summary, "requestBody": dict(_json(body), required=True),
                     "responses": {"200": {"description": ok},
                                   "4XX": dict(_json(_ERROR), description="bad request")}}}


def _get(summary: str) -> dict:
    return {"get": {"summary": summary, "responses": {"200": {"description": summary}}}}


def document() -> dict:
    chat = {"type": "object", "required": ["model", "messages"], "properties": dict(
        _SAMPLING, messages={"type": "array", "minItems": 1, "items": _CHAT_MESSAGE},
        tools={"type": "array", "items": {"type": "object"}},
        tool_choice={"anyOf": [{"type": "string"}, {"type": "object"}]})}
    completion = {"type": "object", "required": ["model", "prompt"],
                  "properties": dict(_SAMPLING, prompt={"type": "string", "minLength": 1})}
    responses = {"type": "object", "required": ["model", "input"], "properties": {
        "model": {"type": "string"}, "instructions": {"type": "string"},
        "input": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]},
        "max_output_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "tools": {"type": "array", "items": {"type": "object"}},
        "tool_choice": {"anyOf": [{"type": "string"}, {"type": "object"}]},
        "previous_response_id": {"type": "string"}, "store": {"type": "boolean"},
        "stream": {"type": "boolean"}}}
    warm = {"type": "object", "properties": {
        "messages": {"type": "array", "items": _CHAT_MESSAGE}, "prompt": {"type": "string"},
        "tools": {"type": "array", "items": {"type": "object"}}, "pin": {"type": "boolean"}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "kvtier", "version": "0.1.0",
                 "description": "Tiered RAM/SSD KV-cache daemon for MLX: OpenAI- and Anthropic-compatible."},
        "paths": {
            "/v1/chat/completions": _post("Chat completion (OpenAI)", chat),
            "/v1/completions": _post("Text completion (OpenAI)", completion),
            "/v1/responses": _post("Response (OpenAI Responses API)", responses),
            "/v1/messages": _post("Messages (Anthropic)", _ANTHROPIC_MESSAGES),
            "/v1/messages/count_tokens": _post("Count prompt tokens (Anthropic)",
                                               dict(_ANTHROPIC_MESSAGES, required=["model", "messages"])),
            "/v1/models": _get("The loaded model"),
            "/health": _get("Liveness: 200 once the model is loaded"),
            "/cache/stats": _get("Tiers, budgets and counters"),
            "/cache/entries": _get("Cached prefixes"),
            "/cache": {"delete": {"summary": "Purge cached entries", "parameters": [
                {"name": n, "in": "query", "schema": {"type": "string"}}
                for n in ("all", "model", "older_than", "to_size")],
                "responses": {"200": {"description": "what was removed"}}}},
            "/cache/warm": _post("Prefill a prompt and persist it", warm, "tokens warmed"),
            "/metrics": _get("Prometheus metrics"),
        },
    }


routes = web.RouteTableDef()


@routes.get("/openapi.json")
async def openapi(_: web.Request) -> web.Response:
    return web.json_response(document())
