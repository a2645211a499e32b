"""One request as the asyncio side sees it: its stream of deltas, the errors it can end with
(the serving layer maps them to HTTP statuses), and the observer that the telemetry implements."""

from __future__ import annotations

import asyncio
import time
from collections import deque
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
    the request if it is unfinished. The bridge feeds it with `put` (event loop thread only).

    A deque and at most one waiting future rather than an asyncio.Queue: `put` runs for every
    token of every request on the event loop, so it must cost about a microsecond."""

    def __init__(self, request_id: str, abort: Callable[[], None]) -> None:
        self.request_id = request_id
        self.arrival_time = time.monotonic()
        self.done = False  # the last delta (or an error) was delivered
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.num_generation_tokens = 0
        self.num_prompt_tokens = 0
        self.share_key: str | None = None  # the API key's name (admission's fair part)
        self.finish_reason: str | None = None  # of the last sample to finish
        self._abort = abort
        self._items: deque[RequestDelta | BaseException] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._consumed_last = False

    def put(self, item: RequestDelta | BaseException) -> int:
        """Deliver a delta (recording its token timings) or the error that ends the request; the
        number of new tokens it carries."""
        num_new = 0
        if isinstance(item, RequestDelta):
            for sample in item.samples:
                num_new += len(sample.token_ids)
                if sample.finish_reason:
                    self.finish_reason = sample.finish_reason
            self.num_generation_tokens += num_new
            if num_new:
                self.first_token_time = self.first_token_time or item.time
                self.last_token_time = item.time
            self.done = item.finished
            self.num_prompt_tokens = len(item.prompt_token_ids)
        else:
            self.done = True
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
        return num_new

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestDelta:
        if self._consumed_last:
            raise StopAsyncIteration
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        item = self._items.popleft()
        if isinstance(item, BaseException):
            self._consumed_last = True
            raise item
        # Behind the engine: take every delta already queued as one (deltas.merge_deltas); an
        # error stays queued, for the next call.
        while not item.finished and self._items and isinstance(self._items[0], RequestDelta):
            item = merge_deltas(item, self._items.popleft())
        self._consumed_last = item.finished
        return item

    def close(self) -> None:
        """Abort the request if it is still running (client gone, error while answering)."""
        if not self.done:
            self.done = True
            self._abort()
