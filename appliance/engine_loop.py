"""EngineLoop: the synchronous engine's step loop, fed by commands, emitting streaming deltas.

It runs wherever the engine lives: on the server's engine thread (appliance/async_engine.py), or in
the engine process (appliance/engine_process.py, `hearth serve --engine-process`). The same code in
both places: commands come from a queue or a pipe, deltas and failures go to the event loop or
down the pipe.

    commands (Add / Abort / SnapshotRequest / Stop) ──► add_prepared / abort_request / snapshot
    engine.step() ──► deltas (the engine's own, or DeltaTracker's) ──► emit(deltas)
    failures ──► fail(request_id, error)

A command source behaves like `queue.Queue.get`: `get(block, timeout)` returns the next command
or raises `queue.Empty`.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from hearth.appliance.deltas import DeltaTracker, RequestDelta
from hearth.appliance.request_stream import RequestFailedError
from hearth.engine.prepare import PreparedRequest
from hearth.engine.snapshot import EngineSnapshot

logger = logging.getLogger("hearth.engine")

_IDLE_STEP_S = 0.001
IDLE_HEALTH_CHECK_S = 1.0  # an idle engine still notices a dead worker within this


@dataclass(frozen=True)
class Add:
    request_id: str
    request: PreparedRequest
    priority: int


@dataclass(frozen=True)
class Abort:
    request_id: str
    notify: bool  # send the consumer a last delta (server-side abort); not when the client left


@dataclass(frozen=True)
class SnapshotRequest:
    """Answer with `engine.snapshot()` between two steps (the engine process's readers)."""


@dataclass(frozen=True)
class Stop:
    """Leave the loop; the engine is shut down by whoever started it."""


class CommandSource(Protocol):
    def get(self, block: bool = True, timeout: float | None = None) -> Any: ...


class EngineLoop:
    def __init__(
        self,
        commands: CommandSource,
        emit: Callable[[list[RequestDelta]], None],
        fail: Callable[[str, BaseException], None],
        on_snapshot: Callable[[EngineSnapshot], None] | None = None,
        prepare: Callable[[PreparedRequest], PreparedRequest] | None = None,
    ) -> None:
        """`prepare`: applied to each request before the engine takes it (the engine process
        compiles its grammar there); a ValueError it raises fails that request."""
        self._commands = commands
        self._emit = emit
        self._fail = fail
        self._on_snapshot = on_snapshot
        self._prepare = prepare
        self._tracker = DeltaTracker()
        self._native = False  # the engine reports deltas itself (run())

    def run(self, engine: Any) -> None:
        """Step until a Stop; an exception from the engine propagates (the engine is dead).
        HEARTH_PROFILE_ENGINE_THREAD=FILE writes a cProfile of the loop there (bench/served.py).

        An engine that can report deltas itself (LLMEngine.emit_deltas) is asked to: no
        cumulative outputs built each step and sliced again here; the tracker then only follows
        which samples finished, for the deltas of aborts."""
        self._native = getattr(engine, "emit_deltas", None) is not None
        if self._native:
            engine.emit_deltas = True
        profile_to = os.environ.get("HEARTH_PROFILE_ENGINE_THREAD")
        if not profile_to:
            self._steps(engine)
            return
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        try:
            self._steps(engine)
        finally:
            profiler.disable()
            profiler.dump_stats(profile_to)

    def _steps(self, engine: Any) -> None:
        while self._apply_commands(engine, block=not engine.has_unfinished_requests()):
            if not engine.has_unfinished_requests():
                continue
            started = time.monotonic()
            outputs = engine.step()
            now = time.monotonic()
            if self._native:
                deltas = self._tracker.observe(outputs)
            else:
                deltas = self._tracker.update(outputs, now)
            if deltas:
                self._emit(deltas)
            elif now - started < _IDLE_STEP_S:
                time.sleep(_IDLE_STEP_S)  # nothing could be scheduled: do not spin a core

    def _apply_commands(self, engine: Any, block: bool) -> bool:
        """Run the queued commands; wait for one when idle. False when told to stop."""
        try:
            command = self._commands.get(block=block, timeout=IDLE_HEALTH_CHECK_S if block
                                         else None)
        except queue.Empty:
            if block:
                engine.check_health()  # raises: the loop dies, the server exits 1
            return True
        while True:
            if isinstance(command, Stop):
                return False
            if isinstance(command, Add):
                self._add(engine, command)
            elif isinstance(command, Abort):
                self._abort_now(engine, command)
            elif isinstance(command, SnapshotRequest) and self._on_snapshot is not None:
                self._on_snapshot(engine.snapshot())
            try:
                command = self._commands.get(block=False)
            except queue.Empty:
                return True

    def _add(self, engine: Any, command: Add) -> None:
        try:
            request = command.request if self._prepare is None else self._prepare(command.request)
            engine.add_prepared(command.request_id, request, command.priority)
        except ValueError as error:
            self._fail(command.request_id, error)
            return
        except Exception as error:  # noqa: BLE001 - this request fails, the others go on
            logger.exception("adding request %s failed", command.request_id)
            engine.abort_request(command.request_id)
            self._fail(command.request_id, RequestFailedError(str(error)))
            return
        self._tracker.start(command.request_id, command.request.params.n)

    def _abort_now(self, engine: Any, command: Abort) -> None:
        engine.abort_request(command.request_id)
        last = self._tracker.abort(command.request_id, time.monotonic())
        if command.notify and last is not None:
            self._emit([last])
