"""Request body size cap: 413 before a large body is read, whatever way it arrives.

    Content-Length over the cap ──► 413 at once; not a byte of the body is read
    chunked / no Content-Length ──► bytes counted as the route reads them; past the cap the read
                                    raises BodyTooLargeError (an APIError: the routes' error
                                    handling answers 413), or this middleware answers 413 itself
                                    when nothing has been sent yet

Without it one 20 MiB POST held the event loop for seconds (JSON parsing, tokenizing) and grew
the server's memory by hundreds of MiB. The cap applies to every route (the UI's included).
"""

from __future__ import annotations

import json
from typing import Any

from hearth.appliance.protocol import APIError


class BodyTooLargeError(APIError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large_message(limit), type="invalid_request_error",
                         code="request_too_large")


def too_large_message(limit: int) -> str:
    return (f"the request body is larger than this server's limit of {limit} bytes "
            f"({limit / (1 << 20):g} MiB); send a shorter prompt, or start the server with a "
            "larger --max-request-body-mib")


class BodySizeLimit:
    """ASGI middleware: bodies over `max_bytes` get 413 (OpenAI's format; Ollama's on /api)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _answer_413(scope, send, self.max_bytes)
            return
        started = False
        received = 0

        async def counted_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLargeError(self.max_bytes)
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLargeError:
            if not started:
                await _answer_413(scope, send, self.max_bytes)


def _content_length(scope: dict) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _answer_413(scope: dict, send: Any, limit: int) -> None:
    error = BodyTooLargeError(limit)
    ollama = scope.get("path", "").startswith("/api/")  # Ollama's error format there
    body = json.dumps({"error": error.message} if ollama else error.body()).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]  # the unread body is not worth draining
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
