"""One request as the asyncio side sees it: its stream of deltas, the errors it can end with
(the serving layer maps them to HTTP statuses), and the observer that the telemetry implements."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from hearth.appliance.deltas import RequestDelta, merge_deltas


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
    """The deltas of one request, in order, with its token timings. Iterate it; `close()` aborts
    the request if it is unfinished. The bridge feeds it with `put` (event loop thread only)."""

    def __init__(self, request_id: str, abort: Callable[[], None]) -> None:
        self.request_id = request_id
        self.arrival_time = time.monotonic()
        self.done = False  # the last delta (or an error) was delivered
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.num_generation_tokens = 0
        self.num_prompt_tokens = 0
        self.finish_reason: str | None = None  # of the last sample to finish
        self._abort = abort
        self._queue: asyncio.Queue[RequestDelta | BaseException] = asyncio.Queue()
        self._consumed_last = False

    def put(self, item: RequestDelta | BaseException) -> None:
        """Deliver a delta (recording its token timings) or the error that ends the request."""
        if isinstance(item, RequestDelta):
            num_new = sum(len(sample.token_ids) for sample in item.samples)
            self.num_generation_tokens += num_new
            if num_new:
                self.first_token_time = self.first_token_time or item.time
                self.last_token_time = item.time
            self.done = item.finished
            self.num_prompt_tokens = len(item.prompt_token_ids)
            reasons = [s.finish_reason for s in item.samples if s.finish_reason]
            self.finish_reason = reasons[-1] if reasons else self.finish_reason
        else:
            self.done = True
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestDelta:
        if self._consumed_last:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._consumed_last = True
            raise item
        # Behind the engine: take every delta already queued as one (deltas.merge_deltas); an
        # error stays queued, for the next call.
        while not item.finished and not self._queue.empty():
            queued = self._queue._queue[0]  # noqa: SLF001 - a peek; asyncio.Queue has none
            if isinstance(queued, BaseException):
                break
            item = merge_deltas(item, self._queue.get_nowait())
        self._consumed_last = item.finished
        return item

    def close(self) -> None:
        """Abort the request if it is still running (client gone, error while answering)."""
        if not self.done:
            self.done = True
            self._abort()
