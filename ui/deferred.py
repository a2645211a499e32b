"""`hearth serve`'s UI, mounted once the model is ready, so the API's first token does not wait
for gradio.

Importing gradio takes 2.4 s on the 2-core box (it writes its components' .pyi stubs at import)
and loading the default model 1.7 s; in parallel threads they fight over the GIL and both get
slower (measured: 8.1 s in sequence, 10.0 s in parallel). So the server starts with a small
placeholder at / ("the UI is starting", refreshing itself every second), serves the API as soon
as the engine is ready, and once no request has been in flight for a second (at most 30 s after
ready) imports gradio on a worker thread, builds the UI
(ui/app.py) in a sub-application, runs that application's lifespan (gradio's queue, the
monitor's sampler) and swaps it in. Routes added before the mount (/v1, /health, /metrics, ...)
still match first.

If the engine never gets ready the placeholder stays; if the UI cannot be built the placeholder
says why and the API serves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

from hearth.appliance.serving.context import AppContext

logger = logging.getLogger("hearth.ui")
_QUIET_S = 1.0  # no request in flight for this long: build the UI
_QUIET_MAX_S = 30.0  # under constant load, build it anyway after this

_REFRESH = '<meta http-equiv="refresh" content="1">'
_STARTING = """<!doctype html><html><head><meta charset="utf-8"><title>Hearth</title>
{refresh}</head>
<body style="font-family: system-ui, sans-serif; margin: 3em; color: #333">
<h2>Hearth</h2><p>{message}</p><p>The API at <code>/v1</code> serves once the model is ready.</p>
</body></html>"""


class DeferredApp:
    """An ASGI app that answers with a placeholder page until `target` is set, then is `target`."""

    def __init__(self) -> None:
        self.target: Any = None
        self.message = "The model is loading; the chat UI starts right after it."
        self.failed = False

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if self.target is not None:
            await self.target(scope, receive, send)
        elif scope["type"] == "http":
            refresh = "" if self.failed else _REFRESH  # failed: nothing more will come
            body = _STARTING.format(message=html.escape(self.message), refresh=refresh).encode()
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"text/html; charset=utf-8"), (b"retry-after", b"1"),
                (b"cache-control", b"no-store"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1013})  # try again later


def mount_ui_when_ready(app: FastAPI, context: AppContext) -> DeferredApp:
    """Mount the placeholder at / now and the real UI once the engine is ready (see above)."""
    deferred = DeferredApp()
    app.mount("/", deferred)
    outer = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
        async with outer(app) as state, contextlib.AsyncExitStack() as stack:
            task = asyncio.ensure_future(_mount_later(deferred, context, stack))
            try:
                yield state
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app.router.lifespan_context = lifespan
    return deferred


async def _mount_later(deferred: DeferredApp, context: AppContext,
                       stack: contextlib.AsyncExitStack) -> None:
    if not await context.engine.wait_loaded():
        deferred.message, deferred.failed = "The model could not be loaded: see the log.", True
        return
    deferred.message = "The model is ready; the chat UI is starting."
    await _quiet_moment(context)
    try:
        ui_app = await asyncio.to_thread(_build_ui_app, context)
        await stack.enter_async_context(ui_app.router.lifespan_context(ui_app))
    except Exception as error:  # noqa: BLE001 - the API serves on without the UI
        logger.exception("the UI could not start; the API serves on")
        deferred.message, deferred.failed = f"The UI could not start: {error}", True
        return
    deferred.target = ui_app
    logger.info("the UI is ready")


async def _quiet_moment(context: AppContext) -> None:
    """Wait until no request is in flight for a moment (at most _QUIET_MAX_S): the gradio import
    holds the GIL for seconds, and the first API request after a restart should not pay for it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _QUIET_MAX_S
    quiet_since = loop.time()
    while loop.time() < deadline:
        if context.engine.num_in_flight:
            quiet_since = loop.time()
        elif loop.time() - quiet_since >= _QUIET_S:
            return
        await asyncio.sleep(0.05)


def _build_ui_app(context: AppContext) -> FastAPI:
    from hearth.ui.app import mount_ui  # gradio: imported here, off the event loop

    ui_app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    mount_ui(ui_app, context)
    return ui_app
