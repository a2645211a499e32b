"""What AsyncEngine's callers see besides the engine: its states, the errors a request can get
(mapped to HTTP statuses by appliance/serving.py), the observer the telemetry implements, and the
stream of one request's deltas."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Protocol

from hearth.appliance.deltas import RequestDelta

if TYPE_CHECKING:
    from hearth.appliance.async_engine import AsyncEngine


class EngineState(Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    DEAD = "dead"
    STOPPED = "stopped"


class EngineUnavailableError(Exception):
    """The engine cannot take or finish requests: loading, shutting down, or dead (HTTP 503)."""


class QueueFullError(Exception):
    """Too many requests in flight (HTTP 429)."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestFailedError(Exception):
    """An unexpected error while adding one request; the engine keeps serving the others (500)."""


@dataclass(frozen=True)
class FinishedRequest:
    num_prompt_tokens: int
    num_generation_tokens: int
    finish_reason: str  # of the last sample to finish
    e2e_s: float
    ttft_s: float | None


class RequestObserver(Protocol):
    """What the telemetry wants to hear about each request (times from time.monotonic())."""

    def on_first_token(self, ttft_s: float) -> None: ...

    def on_token_gap(self, itl_s: float) -> None: ...

    def on_finished(self, request: FinishedRequest) -> None: ...

    def on_rejected(self) -> None: ...


class RequestStream:
    """The deltas of one request, in order. Iterate it; `close()` aborts it if unfinished."""

    def __init__(self, request_id: str, owner: AsyncEngine) -> None:
        self.request_id = request_id
        self.arrival_time = time.monotonic()
        self.done = False  # the last delta (or an error) was delivered
        self._owner = owner
        self._queue: asyncio.Queue[RequestDelta | BaseException] = asyncio.Queue()
        self._consumed_last = False
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.num_generation_tokens = 0

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestDelta:
        if self._consumed_last:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._consumed_last = True
            raise item
        self._consumed_last = item.finished
        return item

    def close(self) -> None:
        """Abort the request if it is still running (client gone, error while answering)."""
        if not self.done:
            self._owner._abort(self.request_id, notify=False)
