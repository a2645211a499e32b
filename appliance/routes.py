"""The FastAPI app: factory, lifespan, thin routes. Each route authenticates, parses the body into a
protocol schema, and hands over to serving; every error leaves in OpenAI's format.

    /v1/completions (alias /v1/fim/completions)  /v1/chat/completions  /v1/models
    /tokenize  /detokenize                                                      API key if set
    /health  /version  /metrics                                                  open
    /api/...: Ollama's API, in ollama_routes.py (registered below, errors in Ollama's format)

Named keys (endpoints, quotas, concurrency) and the audit log are handled before any route, by the
KeyGate middleware (auth/gate.py); the routes' own check covers only a lone --api-key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import wraps
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from hearth import __version__
from hearth.appliance.async_engine import Engine, EngineState
from hearth.appliance.auth.gate import KeyGate
from hearth.appliance.body_limit import BodySizeLimit
from hearth.appliance.gc_heap import GcPauses, freeze_heap
from hearth.appliance.ollama_routes import add_ollama_routes
from hearth.appliance.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse_request,
)
from hearth.appliance.responses import StreamResponse, until_disconnect
from hearth.appliance.security import HostOriginGuard, allowed_host_names, check_api_key
from hearth.appliance.serving.context import AppContext, build_context
from hearth.appliance.serving.core import api_error
from hearth.appliance.serving.tokens import detokenize, tokenize
from hearth.appliance.settings import Settings

logger = logging.getLogger("hearth.server")
T = TypeVar("T")


def create_app(settings: Settings, engine_factory: Callable[[], Engine]) -> FastAPI:
    """The app; the engine loads (on its thread) when the lifespan starts."""
    context = build_context(settings, engine_factory)
    gc_pauses = GcPauses()
    context.telemetry.registry.register(gc_pauses)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        context.engine.start()
        naming = asyncio.ensure_future(_name_metrics_when_ready(context))
        gc_pauses.install()
        yield
        gc_pauses.uninstall()
        naming.cancel()
        await asyncio.to_thread(context.engine.shutdown)
        context.serving.pool.shutdown()
        context.telemetry.close()
        context.auth.close()

    app = FastAPI(
        title="Hearth",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.hearth = context
    _add_routes(app, context)
    add_ollama_routes(app, context)  # /api: Ollama's API, translated to the serving layer
    app.add_exception_handler(HTTPException, _http_exception)
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.allowed_origins),
            allow_methods=["*"],
            allow_headers=["*"],
        )
    auth = context.auth
    app.add_middleware(KeyGate, auth=auth, model_name=lambda: _model_name(context))
    hosts = allowed_host_names(settings.host, settings.allowed_hosts)
    app.add_middleware(HostOriginGuard, hosts=hosts, origins=settings.allowed_origins)
    app.add_middleware(BodySizeLimit, max_bytes=int(settings.max_request_body_mib * (1 << 20)))
    return app


def _model_name(context: AppContext) -> str | None:
    return context.telemetry.model_name or None


async def _name_metrics_when_ready(context: AppContext) -> None:
    await context.engine.wait_ready()
    context.telemetry.model_name = context.serving.model_names()[0]
    freeze_heap()  # the loaded heap, out of every later collection's walk (gc_heap.py)


def _openai_errors(route: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Any exception a route raises leaves as an OpenAI-format error; the server goes on."""

    @wraps(route)
    async def wrapper(request: Request) -> Any:
        try:
            return await route(request)
        except Exception as error:  # noqa: BLE001
            if api_error(error).status == 500:
                logger.exception("%s %s failed", request.method, request.url.path)
            return error_response(api_error(error))

    return wrapper


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _http_exception(request: Request, exc: HTTPException) -> JSONResponse:
    message = "no such route" if exc.status_code == 404 else str(exc.detail)
    return error_response(
        APIError(
            exc.status_code,
            f"{message}: {request.method} {request.url.path}",
            code=str(exc.status_code),
        )
    )


def _add_routes(app: FastAPI, context: AppContext) -> None:
    serving, completions, chat = context.serving, context.completions, context.chat
    api_key = context.settings.route_api_key

    def authenticate(request: Request) -> None:
        check_api_key(request.headers.get("authorization"), api_key)

    async def parse_off_loop(schema: type[T], request: Request) -> T:
        """The body (capped by body_limit.py) parsed on the tokenize pool, not the loop."""
        return await serving.offload(parse_request, schema, await request.body(),
                                     serving.unknown_fields)

    @app.get("/health")
    async def health() -> Response:
        state = context.engine.state
        code = 200 if state is EngineState.READY else 503
        return JSONResponse({"status": "ok" if code == 200 else state.value}, status_code=code)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        # On a thread: engine.snapshot() may wait for the engine step in progress.
        body = await asyncio.to_thread(context.telemetry.render)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    @_openai_errors
    async def models(request: Request) -> Any:
        authenticate(request)
        return serving.list_models()

    @app.post("/v1/completions")
    @app.post("/v1/fim/completions")  # the same endpoint: some FIM clients post here
    @_openai_errors
    async def create_completion(request: Request) -> Any:
        authenticate(request)
        body = await parse_off_loop(CompletionRequest, request)
        serving.resolve_model(body.model)
        checked = await serving.offload(completions.prepare, body)
        if body.stream:
            return StreamResponse(completions.stream(body, checked))
        return await until_disconnect(request, completions.create(body, checked))

    @app.post("/v1/chat/completions")
    @_openai_errors
    async def create_chat_completion(request: Request) -> Any:
        authenticate(request)
        body = await parse_off_loop(ChatCompletionRequest, request)
        serving.resolve_model(body.model)
        plan = await serving.offload(chat.plan, body)
        if body.stream:
            return StreamResponse(chat.stream(body, plan))
        return await until_disconnect(request, chat.create(body, plan))

    @app.post("/tokenize")
    @_openai_errors
    async def tokenize_route(request: Request) -> Any:
        authenticate(request)
        body = await parse_off_loop(TokenizeRequest, request)
        return await serving.offload(tokenize, serving, body)

    @app.post("/detokenize")
    @_openai_errors
    async def detokenize_route(request: Request) -> Any:
        authenticate(request)
        body = parse_request(DetokenizeRequest, await request.body(), serving.unknown_fields)
        return detokenize(serving, body)
