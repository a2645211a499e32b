"""AsyncEngine: the synchronous LLMEngine on its own thread, bridged to asyncio.

    asyncio side (event loop)                       engine thread (EngineLoop, engine_loop.py)
    submit() ── Add ──► commands (queue.Queue) ──►  engine.add_request / abort_request
                                                    engine.step() → RequestDelta
    RequestStream ◄── asyncio.Queue ◄── _deliver ◄── call_soon_threadsafe ◄──┘
    (a consumer behind takes its queued deltas as one)   (one wake-up while the loop is behind)

With `engine_process=True` (`hearth serve --engine-process`) the EngineLoop runs in a process of
its own and this side's threads only forward commands and decoded deltas (engine_process.py).

Only the engine thread touches the engine (except `snapshot()`, which the engine makes
thread-safe, and the tokenizer). Admission is bounded: at most `max_num_seqs + max_queued_requests`
requests in flight, past that `QueueFullError` (the API answers 429 with Retry-After). If the engine
thread dies, every in-flight request fails with `EngineUnavailableError` (503) and `wait_dead()`
returns, so the server can exit non-zero and let its supervisor restart it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import queue
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from enum import Enum
from typing import Any, Protocol

from hearth.appliance.deltas import ABORT, RequestDelta
from hearth.appliance.engine_loop import Abort, Add, EngineLoop, Stop
from hearth.appliance.request_stream import (
    EngineUnavailableError,
    FinishedRequest,
    QueueFullError,
    RequestObserver,
    RequestStream,
)
from hearth.engine.outputs import RequestOutput
from hearth.engine.prepare import ModelInfo, PreparedRequest
from hearth.engine.snapshot import EngineSnapshot

logger = logging.getLogger("hearth.engine")


class EngineState(Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    DEAD = "dead"
    STOPPED = "stopped"


class Engine(Protocol):
    """What the bridge needs of a synchronous engine: LLMEngine, or tests/fake_engine.py's
    FakeEngine (tests/test_async_engine_contract.py checks both against it)."""

    model_info: ModelInfo

    def add_prepared(self, request_id: str, request: PreparedRequest, priority: int = 0) -> None:
        ...

    def abort_request(self, request_id: str) -> None: ...

    def has_unfinished_requests(self) -> bool: ...

    def step(self) -> list[RequestOutput]: ...

    def snapshot(self) -> EngineSnapshot: ...

    def check_health(self) -> None:
        """Raise if the engine can no longer step (a tensor-parallel worker died)."""

    def shutdown(self) -> None: ...


_STOP = Stop()


class AsyncEngine:
    def __init__(
        self,
        engine_factory: Callable[[], Engine],
        max_num_seqs: int,
        max_queued_requests: int,
        observer: RequestObserver | None = None,
        engine_process: bool = False,
        log_level: str = "info",
    ) -> None:
        self._engine_factory = engine_factory
        self._engine_process = engine_process  # the engine in its own process (engine_process.py)
        self._log_level = log_level
        self.max_in_flight = max_num_seqs + max_queued_requests
        self._observer = observer
        self._engine: Engine | None = None
        self._state = EngineState.LOADING
        self.error: BaseException | None = None
        self._streams: dict[str, RequestStream] = {}
        self._commands: queue.Queue[Any] = queue.Queue()
        # Deltas of steps the event loop has not taken yet: one call_soon_threadsafe while the
        # loop is behind, however many steps end meanwhile (the engine thread does not flood the
        # loop with callbacks, and each wake-up serves several steps).
        self._pending: list[RequestDelta] | None = None
        self._pending_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="hearth-engine", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = asyncio.Event()
        self._dead = asyncio.Event()
        self._mean_e2e_s = 1.0

    # ---- lifecycle (event loop side) ----

    def start(self) -> None:
        """Load the engine and run its loop on the engine thread. Call from the event loop."""
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def model(self) -> ModelInfo:
        """The loaded model's name, context length and tokenizer."""
        if self._engine is None:
            raise EngineUnavailableError(self._unavailable_reason())
        return self._engine.model_info

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def wait_dead(self) -> None:
        await self._dead.wait()

    async def wait_loaded(self) -> bool:
        """Until the engine is ready (True) or died loading (False)."""
        ready = asyncio.ensure_future(self._ready.wait())
        dead = asyncio.ensure_future(self._dead.wait())
        try:
            await asyncio.wait({ready, dead}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            dead.cancel()
        return self._ready.is_set()

    def snapshot(self) -> EngineSnapshot | None:
        return self._engine.snapshot() if self._engine is not None else None

    @property
    def engine_pid(self) -> int | None:
        """The process the engine steps in: this one, or the engine process (None: not yet)."""
        if not self._engine_process:
            return os.getpid()
        process = getattr(self._engine, "process", None)
        return process.pid if process is not None else None

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    async def drain(self, timeout_s: float) -> None:
        """Stop admitting; give in-flight requests `timeout_s` to finish, then abort the rest."""
        if self._state in (EngineState.LOADING, EngineState.READY):
            self._state = EngineState.DRAINING
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._streams and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self._streams:
            logger.warning(
                "aborting %d request(s) still running after %.0f s", len(self._streams), timeout_s
            )
        for request_id in list(self._streams):
            self._commands.put(Abort(request_id, notify=True))
        deadline = loop.time() + 5.0  # the aborted requests' last deltas
        while self._streams and self._state is not EngineState.DEAD and loop.time() < deadline:
            await asyncio.sleep(0.02)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        if self._state is not EngineState.DEAD:
            self._state = EngineState.STOPPED
        self._commands.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    # ---- requests (event loop side) ----

    def check_admission(self, num_requests: int = 1, key: str | None = None) -> None:
        """Raise unless `num_requests` more requests may start now (all of them, or none).
        `key`: the API key's name (its fair-share flow), see `_within_fair_part`."""
        if self._state is not EngineState.READY:
            raise EngineUnavailableError(self._unavailable_reason())
        if (len(self._streams) + num_requests > self.max_in_flight
                and not self._within_fair_part(key, num_requests)):
            if self._observer is not None:
                self._observer.on_rejected()
            retry_after = min(60, max(1, math.ceil(self._mean_e2e_s)))
            raise QueueFullError(
                f"the server is busy: {len(self._streams)} requests in flight, limit "
                f"{self.max_in_flight}; retry in {retry_after} s",
                retry_after,
            )

    def _within_fair_part(self, key: str | None, num_requests: int) -> bool:
        """Over the in-flight limit, a named key still gets in while it holds less than an equal
        part of the limit among the keys with requests in flight (up to twice the limit in
        all): one key flooding the queue does not turn the other keys away with 429s."""
        if key is None or len(self._streams) + num_requests > 2 * self.max_in_flight:
            return False
        held = Counter(stream.share_key for stream in self._streams.values())
        keys = {name for name in held if name is not None} | {key}
        return held[key] + num_requests <= self.max_in_flight // len(keys)

    def submit(self, request_id: str, request: PreparedRequest, priority: int = 0) -> RequestStream:
        """Start a request that `prepare` checked (engine/prepare.py)."""
        self.check_admission(1, request.share_key)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = RequestStream(request_id, abort=lambda: self._forget(request_id))
        stream.share_key = request.share_key
        self._streams[request_id] = stream
        self._commands.put(Add(request_id, request, priority))
        return stream

    async def generate(
        self, request_id: str, request: PreparedRequest, priority: int = 0
    ) -> AsyncIterator[RequestDelta]:
        """submit() as an async generator that aborts the request when the consumer stops early."""
        stream = self.submit(request_id, request, priority)
        try:
            async for delta in stream:
                yield delta
        finally:
            stream.close()

    def _forget(self, request_id: str) -> None:
        """The consumer left (its stream closed): abort without a last delta."""
        if self._streams.pop(request_id, None) is not None:
            self._commands.put(Abort(request_id, notify=False))

    def _unavailable_reason(self) -> str:
        if self._state is EngineState.LOADING:
            return "the model is still loading; retry shortly"
        if self._state is EngineState.DEAD:
            return f"the engine has stopped after an error: {self.error}"
        return "the server is shutting down"

    # ---- deliveries (event loop side, scheduled by the engine thread) ----

    def _deliver(self, deltas: list[RequestDelta]) -> None:
        for delta in deltas:
            stream = self._streams.get(delta.request_id)
            if stream is None:
                continue
            last_token_time = stream.last_token_time
            has_tokens = stream.put(delta) > 0
            if delta.finished:
                del self._streams[delta.request_id]
            try:
                self._observe(stream, delta, last_token_time, has_tokens)
            except Exception:  # noqa: BLE001 - metrics must never cost a request its answer
                logger.exception("recording metrics for %s failed", delta.request_id)

    def _hand_over(self, deltas: list[RequestDelta]) -> None:
        """Engine thread: queue a step's deltas for the loop, waking it only if it is not
        already due to take the queue."""
        with self._pending_lock:
            if self._pending is not None:
                self._pending.extend(deltas)
                return
            self._pending = deltas
        self._call_soon(self._take_pending)

    def _take_pending(self) -> None:
        with self._pending_lock:
            deltas, self._pending = self._pending, None
        self._deliver(deltas)  # set before this callback was scheduled

    def _fail(self, request_id: str, error: BaseException) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.put(error)

    def _observe(self, stream: RequestStream, delta: RequestDelta,
                 last_token_time: float | None, has_tokens: bool) -> None:
        """Tell the observer about `delta`, already put on `stream`; `last_token_time` is the
        stream's before it."""
        if self._observer is not None and has_tokens:
            if last_token_time is None:
                self._observer.on_first_token(delta.time - stream.arrival_time)
            else:
                self._observer.on_token_gap(delta.time - last_token_time)
        if not delta.finished:
            return
        e2e_s = delta.time - stream.arrival_time
        self._mean_e2e_s = 0.9 * self._mean_e2e_s + 0.1 * e2e_s
        if self._observer is not None:
            reasons = [s.finish_reason for s in delta.samples if s.finish_reason]
            ttft = (
                None
                if stream.first_token_time is None
                else (stream.first_token_time - stream.arrival_time)
            )
            self._observer.on_finished(
                FinishedRequest(
                    len(delta.prompt_token_ids),
                    stream.num_generation_tokens,
                    reasons[-1] if reasons else ABORT,
                    e2e_s,
                    ttft,
                )
            )

    def _on_ready(self) -> None:
        if self._state is EngineState.LOADING:
            self._state = EngineState.READY
        self._ready.set()

    def _on_dead(self, error: BaseException) -> None:
        self._state = EngineState.DEAD
        self.error = error
        for request_id in list(self._streams):
            self._fail(request_id, EngineUnavailableError(self._unavailable_reason()))
        self._dead.set()

    def _call_soon(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the event loop is closed: the process is exiting
            pass

    # ---- the engine thread ----

    def _run(self) -> None:
        if self._engine_process:
            self._run_in_process()
            return
        try:
            self._engine = self._engine_factory()
        except BaseException as error:  # noqa: BLE001 - reported, and the server exits non-zero
            logger.error(
                "could not load the model: %s", error, exc_info=not isinstance(error, ValueError)
            )
            self._call_soon(self._on_dead, error)
            return
        self._call_soon(self._on_ready)
        loop = EngineLoop(self._commands, emit=self._hand_over,
                          fail=lambda request_id, error: self._call_soon(self._fail, request_id,
                                                                         error))
        try:
            loop.run(self._engine)
        except BaseException as error:  # noqa: BLE001
            logger.critical("the engine thread died", exc_info=error)
            self._call_soon(self._on_dead, error)
        finally:
            try:
                self._engine.shutdown()
            except Exception:  # noqa: BLE001 - exiting anyway
                logger.exception("engine shutdown failed")

    def _run_in_process(self) -> None:
        """The engine in its own process; this thread receives its output, another sends it
        the commands (appliance/engine_process.py)."""
        from hearth.appliance.engine_process import EngineProcess

        logger.info("the engine steps in a process of its own (--engine-process; `off` keeps it "
                    "on a thread of this one)")
        try:
            process = EngineProcess(self._engine_factory, self._commands, self._log_level)
        except Exception as error:  # noqa: BLE001 - e.g. a factory that does not pickle
            logger.error("could not start the engine process: %s", error)
            self._call_soon(self._on_dead, error)
            return
        try:
            process.wait_ready()
        except BaseException as error:  # noqa: BLE001 - the engine process logged it
            process.stop(5)
            self._call_soon(self._on_dead, error)
            return
        self._engine = process
        self._call_soon(self._on_ready)
        sender = threading.Thread(target=process.send_commands, name="hearth-engine-send",
                                  daemon=True)
        sender.start()
        try:
            error = process.receive(
                on_deltas=self._hand_over,
                on_fail=lambda request_id, error: self._call_soon(self._fail, request_id, error))
        except BaseException as failure:  # noqa: BLE001 - e.g. a message that did not unpickle
            error = failure
        if error is None and self._state is not EngineState.STOPPED:
            error = RuntimeError("the engine process stopped unexpectedly")
        if error is not None:
            logger.critical("the engine process died: %s", error)
            self._call_soon(self._on_dead, error)
        self._commands.put(_STOP)  # the sender, if the engine process died first
        process.stop(5)
        sender.join(5)
