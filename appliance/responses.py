"""HTTP responses that the /v1 and /api routes share: streams (OpenAI's SSE, Ollama's NDJSON)
that abort their requests however the response ends, and non-streamed work that is cancelled,
aborting its requests, when the client hangs up first."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from hearth.appliance.serving.core import EventStream


class StreamResponse(StreamingResponse):
    """A streamed response whose requests are aborted when it ends, finished or not: also when
    the client left before the first byte (the events never started iterating)."""

    def __init__(self, stream: EventStream, media_type: str = "text/event-stream") -> None:
        super().__init__(
            stream.events,
            media_type=media_type,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._stream = stream

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._stream.close()


async def until_disconnect(request: Request, work: Awaitable[Any]) -> Response:
    """Run `work` and answer its result as JSON; if the client hangs up first, cancel it (which
    aborts its requests). `work`'s own exceptions propagate."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        return Response(status_code=499)  # nobody is listening
    return JSONResponse(task.result())


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
