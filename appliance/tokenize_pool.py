"""TokenizePool: a request's CPU work before the engine (JSON parsing, chat template, tokenizing,
grammar compiling) on a few worker threads, never on the event loop.

    event loop ── await pool.run(fn, ...) ──► at most `max_workers` running ──► result / exception
                     │ more waiting: they wait here (asyncio, the loop stays free)
                     └ more than `max_waiting`: QueueFullError (429 with Retry-After)

On the event loop, one 20 MiB prompt held /health for 21 s. Here the loop only waits: /health,
/metrics and streaming answers go on while a worker tokenizes, and the pool's bound keeps a flood of
large requests from queueing unbounded work (and memory) behind it. A long text is encoded through
`tokenizers`' encode_batch, which releases the GIL (engine/tokenizer.py), and Python work (JSON,
Jinja templates) gives the GIL up every few milliseconds, so a worker does not stall the loop.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from hearth.appliance.request_stream import QueueFullError

T = TypeVar("T")
DEFAULT_WORKERS = 2
DEFAULT_MAX_WAITING = 64


class TokenizePool:
    def __init__(self, max_workers: int = DEFAULT_WORKERS,
                 max_waiting: int = DEFAULT_MAX_WAITING) -> None:
        if max_workers < 1 or max_waiting < 0:
            raise ValueError(f"max_workers must be >= 1 and max_waiting >= 0; got {max_workers} "
                             f"and {max_waiting}")
        self.max_workers = max_workers
        self.max_waiting = max_waiting
        self._executor = ThreadPoolExecutor(max_workers, thread_name_prefix="hearth-tokenize")
        self._slots: asyncio.Semaphore | None = None  # made on the event loop that uses it
        self._num_waiting = 0

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    async def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """`fn(*args, **kwargs)` on a worker; its exception propagates. QueueFullError when
        `max_waiting` calls already wait for a worker."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_workers)
        if self._slots.locked() and self._num_waiting >= self.max_waiting:
            raise QueueFullError(
                f"the server is busy: {self._num_waiting} requests wait to be tokenized; "
                "retry in 1 s", 1)
        self._num_waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._num_waiting -= 1
        try:
            call = functools.partial(fn, *args, **kwargs)
            future = asyncio.get_running_loop().run_in_executor(self._executor, call)
        except BaseException:
            self._slots.release()
            raise
        # The slot frees when the worker is done, also when the caller was cancelled first.
        future.add_done_callback(lambda _: self._slots.release())
        return await future

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
