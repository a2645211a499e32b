"""Ollama's API on the same port as /v1: thin routes over serving/ollama.py and ollama_models.py.
Every error leaves in Ollama's format, {"error": "..."}.

    GET  /api/version                                                 open, like /version
    GET  /api/tags   /api/ps      POST /api/show                      API key if set
    POST /api/chat   /api/generate   NDJSON stream by default, or one object with stream: false
    POST /api/embed  /api/embeddings                                  501: no embedding model yet
    POST /api/pull /api/push /api/create /api/copy, DELETE /api/delete
                                                  501: the catalogue is `hearth models`' business
The API key, the Host/Origin checks (security.py, before any route) and 429 backpressure are the
same as on /v1; generation requests count in /metrics like any other.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import wraps
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from hearth.appliance.ollama_protocol import (
    OllamaChatRequest,
    OllamaError,
    OllamaGenerateRequest,
    OllamaShowRequest,
    parse_ollama,
)
from hearth.appliance.protocol import APIError
from hearth.appliance.responses import StreamResponse, until_disconnect
from hearth.appliance.security import check_api_key
from hearth.appliance.serving import ollama_models
from hearth.appliance.serving.context import AppContext
from hearth.appliance.serving.core import EventStream, api_error
from hearth.appliance.serving.ollama import OllamaReply, OllamaServing

logger = logging.getLogger("hearth.server")
NDJSON = "application/x-ndjson"
_EMBED_MESSAGE = (
    "embeddings are not available: this server runs a generative model and has no embedding "
    "model yet"
)
_MANAGE_MESSAGE = (
    "this server does not pull, push, create, copy or delete models over the API; manage its "
    "catalogue with `hearth models` and restart it with the model to serve"
)


def ndjson(line: dict[str, Any]) -> str:
    return json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n"


def _ollama_errors(route: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Any exception a route raises leaves as an Ollama-format error; the server goes on."""

    @wraps(route)
    async def wrapper(request: Request) -> Any:
        try:
            return await route(request)
        except OllamaError as error:
            return _error_response(error)
        except Exception as error:  # noqa: BLE001
            openai = api_error(error)
            if openai.status == 500:
                logger.exception("%s %s failed", request.method, request.url.path)
            return _error_response(OllamaError(openai.status, openai.message, openai.headers))

    return wrapper


def _error_response(error: OllamaError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _stream(reply: OllamaReply) -> StreamResponse:
    async def lines() -> AsyncIterator[str]:
        async for line in reply.lines():
            yield ndjson(line)

    streams = [] if reply.stream is None else reply.stream.streams
    return StreamResponse(EventStream(lines(), streams), media_type=NDJSON)


def add_ollama_routes(app: FastAPI, context: AppContext) -> None:
    """Register /api on `app`, over the serving layer of `context`."""
    ollama = OllamaServing(context.serving, context.chat, context.completions)
    serving, api_key = context.serving, context.settings.route_api_key

    def authenticate(request: Request) -> None:
        try:
            check_api_key(request.headers.get("authorization"), api_key)
        except APIError as error:
            raise OllamaError(error.status, error.message) from None

    @app.get("/api/version")
    async def version() -> dict[str, str]:
        return ollama_models.version()

    @app.get("/api/tags")
    @_ollama_errors
    async def tags(request: Request) -> Any:
        authenticate(request)
        return ollama_models.tags(serving.model, serving.model_names())

    @app.get("/api/ps")
    @_ollama_errors
    async def ps(request: Request) -> Any:
        authenticate(request)
        return ollama_models.ps(serving.model, serving.model_names())

    @app.post("/api/show")
    @_ollama_errors
    async def show(request: Request) -> Any:
        authenticate(request)
        body = parse_ollama(OllamaShowRequest, await request.body())
        name = ollama.resolve_model(body.model or body.name)
        return ollama_models.show(serving.model, name, serving.capabilities())

    @app.post("/api/chat")
    @_ollama_errors
    async def chat(request: Request) -> Any:
        authenticate(request)
        body = parse_ollama(OllamaChatRequest, await request.body())
        return await _answer(request, ollama.chat(body), body.stream is not False)

    @app.post("/api/generate")
    @_ollama_errors
    async def generate(request: Request) -> Any:
        authenticate(request)
        body = parse_ollama(OllamaGenerateRequest, await request.body())
        return await _answer(request, ollama.generate(body), body.stream is not False)

    _add_unavailable(app, authenticate)


async def _answer(request: Request, reply: OllamaReply, stream: bool) -> Any:
    """NDJSON lines, or (stream: false) one object, cancelled if the client hangs up first."""
    if stream:
        return _stream(reply)
    try:
        return await until_disconnect(request, reply.whole())
    finally:
        reply.close()


def _add_unavailable(app: FastAPI, authenticate: Callable[[Request], None]) -> None:
    """Ollama routes this server cannot serve: 501 saying why, rather than a bare 404."""

    def unavailable(message: str) -> Callable[[Request], Awaitable[Any]]:
        @_ollama_errors
        async def route(request: Request) -> Any:
            authenticate(request)
            raise OllamaError(501, message)

        return route

    for path in ("/api/embed", "/api/embeddings"):
        app.add_api_route(path, unavailable(_EMBED_MESSAGE), methods=["POST"])
    for path in ("/api/pull", "/api/push", "/api/create", "/api/copy"):
        app.add_api_route(path, unavailable(_MANAGE_MESSAGE), methods=["POST"])
    app.add_api_route("/api/delete", unavailable(_MANAGE_MESSAGE), methods=["DELETE"])
