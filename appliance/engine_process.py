"""The engine in its own process (`hearth serve --engine-process`): vLLM V1's split of the API
server and the engine core.

Why: in one process the engine thread and the event loop take turns under one GIL. On a GPU, where
a step of 256 sequences takes a few ms, that capped the served path at 29-48% of the offline engine
(each token ≈ 36 µs of engine Python plus ≈ 40 µs of event-loop Python, docs/benchmarks.md, "The
served path"). In two processes each side has its own GIL and core.

    API process                                           engine process (spawned)
    AsyncEngine ── commands ─► sender thread ─► pipe ─►   EngineLoop: add / abort / snapshot,
                                                          engine.step(), DeltaTracker
    _hand_over ◄── receiver thread ◄── pipe ◄──────────── one message per step: compact deltas,
                   (TextStreams: detokenize)                 token ids of the plain requests

Messages from the engine process: ("ready", ModelInfo, whether it reports TokenRows) once the
model is loaded (the tokenizer and the grammar compiler travel pickled: the API process tokenizes
and checks requests itself, as in one process), or ("dead", error) if loading or a step failed;
then ("step", time, [...], [...]) once per step: the deltas of requests with n > 1 or logprobs as
plain tuples (the prompt's token ids stay in the API process, which sent them), and every other
request's TokenRow, its new token ids alone, which the API process detokenizes
(appliance/text_streams.py: the engine's host thread, which bounds the served rate, then spends
no Python object per request on text; a stop string found there ends the request at once and
aborts it in the engine); ("fail", request_id, error) for a request the engine refused,
("snapshot", EngineSnapshot) for each SnapshotRequest. A compiled grammar holds an llguidance
matcher, which does not pickle: the request crosses without it and the engine process compiles
the same spec again (cached there too). Times (a delta's `time`, a snapshot's `taken_at`) are the
engine process's `time.monotonic()`, a clock the whole machine shares, so TTFT and inter-token
gaps are measured as in one process.

The engine process ignores SIGINT, SIGTERM and SIGHUP (the API process drains, then sends Stop;
it reloads its keys file on SIGHUP), and it dies with the API process (engine/child_process.py;
the command pipe's end elsewhere). If it dies, the pipe closes, every request in flight fails with
503, and the server exits 1 for its supervisor, as when the engine thread dies in one process.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import math
import multiprocessing
import os
import pickle
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from hearth.appliance.deltas import RequestDelta, SampleDelta
from hearth.appliance.engine_loop import Abort, Add, EngineLoop, SnapshotRequest, Stop
from hearth.appliance.request_stream import RequestFailedError
from hearth.appliance.text_streams import TextStreams
from hearth.engine.child_process import guard_child_process
from hearth.engine.prepare import ModelInfo, PreparedRequest
from hearth.engine.request_state import TokenRow, reports_token_ids
from hearth.engine.snapshot import EngineSnapshot

logger = logging.getLogger("hearth.engine")

_SNAPSHOT_TIMEOUT_S = 10.0  # a step (a long CPU prefill) may hold the answer this long
_SNAPSHOT_SHARED_S = 0.02  # an answer this fresh serves the next reader too


def wanted(setting: str, device: str, num_gpus: int) -> bool:
    """Whether the engine runs in a process of its own (`--engine-process auto|on|off`). auto:
    on for a CUDA device, where many streams share a step and one GIL for engine and event loop
    capped the served rate (W7 on an H100: 21.4k tok/s, 96% of offline, against 10.2k with the
    engine thread; docs/benchmarks.md), off on a CPU (not measured to pay there: a CPU box has few
    cores to give a second process). `num_gpus`: what NVML sees (the telemetry's GpuSampler)."""
    if setting != "auto":
        return setting == "on"
    if device != "auto":
        return device.startswith("cuda")
    return num_gpus > 0 and _cuda_visible() and _torch_has_cuda()


def _cuda_visible() -> bool:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible is None or visible.strip() not in ("", "-1")


def _torch_has_cuda() -> bool:
    """Whether the installed torch is a CUDA build, read from its version.py without importing
    it (the API process never does: it would cost it ~0.5 GB and a second or two). With the GPU
    count this is what `--device auto` will find; when it guesses wrong the engine still runs,
    only in the other mode."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return False
    try:
        version = (Path(spec.submodule_search_locations[0]) / "version.py").read_text()
    except OSError:
        return False
    return re.search(r"^cuda\b[^=\n]*=\s*['\"]", version, re.MULTILINE) is not None


class EngineProcessError(RuntimeError):
    """The engine process exited without saying why (killed, out of memory, a crash in C)."""


class EngineProcess:
    """The API process's side: spawns the engine process, sends it commands, decodes its output.

    `commands` is the queue the server's event loop puts Add / Abort / Stop on; `send_commands()`
    (a thread) forwards it down the pipe, `receive()` (another thread) yields what comes back."""

    def __init__(self, factory: Callable[[], Any], commands: queue.Queue[Any],
                 log_level: str = "info") -> None:
        ctx = multiprocessing.get_context("spawn")  # CUDA and threads: never fork
        child_commands, self._to_child = ctx.Pipe(duplex=False)
        self._from_child, child_outputs = ctx.Pipe(duplex=False)
        self._commands = commands
        self.process = ctx.Process(
            target=_engine_process_main, name="hearth-engine",
            args=(factory, child_commands, child_outputs, log_level), daemon=False)
        self.process.start()
        child_commands.close()  # the child's ends: a dead child then closes the pipes for good
        child_outputs.close()
        # A forced exit (a second SIGTERM while draining) skips the server's shutdown; Python's
        # exit then joins the (non-daemonic) engine process, which waits for commands: stop it
        # first (atexit runs this before multiprocessing's own handler, registered earlier).
        atexit.register(self._stop_at_exit)
        self.model_info: ModelInfo | None = None
        self._prompts: dict[str, list[int]] = {}  # requests whose deltas the engine makes
        self._texts: TextStreams | None = None  # the others (`reports_token_ids`)
        self._snapshot: EngineSnapshot | None = None
        self._snapshot_at = -math.inf
        self._snapshot_lock = threading.Lock()
        self._snapshot_ready = threading.Event()

    def wait_ready(self) -> ModelInfo:
        """Block until the model is loaded; raise what stopped it if it could not load."""
        try:
            message = self._from_child.recv()
        except (EOFError, ConnectionResetError):
            raise self._exited() from None
        if message[0] == "dead":
            raise message[1]
        self.model_info = message[1]
        if message[2]:  # the engine reports TokenRows (LLMEngine.emit_token_ids)
            self._texts = TextStreams(self.model_info.tokenizer)
        return self.model_info

    # ---- commands (sender thread) ----

    def send_commands(self) -> None:
        """Forward the command queue to the engine process until a Stop or a closed pipe."""
        while True:
            command = self._commands.get()
            if isinstance(command, Add):
                request = command.request
                if self._texts is not None and reports_token_ids(request.params):
                    self._texts.start(command.request_id, request.token_ids, request.params)
                else:
                    self._prompts[command.request_id] = request.token_ids
                if request.grammar is not None:
                    command = replace(command, request=replace(request, grammar=None))
            elif isinstance(command, Abort) and not command.notify:
                self._prompts.pop(command.request_id, None)
                if self._texts is not None:
                    self._texts.forget(command.request_id)
            try:
                self._to_child.send(command)
            except (OSError, EOFError):
                return  # the engine process is gone (the receiver reports it), or we exit
            if isinstance(command, Stop):
                return

    # ---- output (receiver thread) ----

    def receive(self, on_deltas: Callable[[list[RequestDelta]], None],
                on_fail: Callable[[str, BaseException], None]) -> BaseException | None:
        """Dispatch the engine process's messages until it ends; returns its error, if any
        (None after a Stop)."""
        while True:
            try:
                message = self._from_child.recv()
            except (EOFError, ConnectionResetError):
                self.process.join(5)
                return None if self.process.exitcode == 0 else self._exited()
            kind = message[0]
            if kind == "step":
                on_deltas(self._decode(*message[1:]))
            elif kind == "fail":
                self._prompts.pop(message[1], None)
                if self._texts is not None:
                    self._texts.forget(message[1])
                on_fail(message[1], message[2])
            elif kind == "snapshot":
                self._snapshot, self._snapshot_at = message[1], time.monotonic()
                self._snapshot_ready.set()
            elif kind == "dead":
                self.process.join(5)
                return message[1]

    def _decode(self, now: float, items: list[tuple], rows: list[TokenRow]) -> list[RequestDelta]:
        prompts = self._prompts
        deltas = []
        for request_id, finished, num_cached, ended_at, samples in items:
            prompt = prompts.pop(request_id, []) if finished else prompts.get(request_id, [])
            if self._texts is not None and request_id in self._texts:  # a plain request's abort
                prompt = self._texts.forget(request_id).prompt_token_ids
            deltas.append(RequestDelta(request_id, [SampleDelta(*s) for s in samples], prompt,
                                       finished, num_cached, ended_at))
        if rows:
            texts, stopped = self._texts.deltas(rows, now)
            deltas.extend(texts)
            for request_id in stopped:  # ended by a stop string here: the engine still runs it
                self._commands.put(Abort(request_id, notify=False))
        return deltas

    def snapshot(self) -> EngineSnapshot | None:
        """The engine's state, asked of the engine process (answered between two steps); readers
        that come together (the monitor, a /metrics scrape) share one answer."""
        if not self.process.is_alive():
            return self._snapshot
        with self._snapshot_lock:
            if time.monotonic() - self._snapshot_at < _SNAPSHOT_SHARED_S:
                return self._snapshot
            self._snapshot_ready.clear()
            self._commands.put(SnapshotRequest())
            self._snapshot_ready.wait(_SNAPSHOT_TIMEOUT_S)
            return self._snapshot

    def stop(self, timeout_s: float) -> None:
        """After Stop: wait for the engine process, then end it if it hangs."""
        self.process.join(timeout_s)
        if self.process.is_alive():
            logger.warning("the engine process did not stop within %.0f s: killing it", timeout_s)
            self.process.kill()
            self.process.join(5)
        atexit.unregister(self._stop_at_exit)

    def _stop_at_exit(self) -> None:
        if self.process.is_alive():
            self._to_child.close()  # the engine process reads the closed pipe as Stop
            self.stop(10)

    def _exited(self) -> EngineProcessError:
        self.process.join(5)
        return EngineProcessError(f"the engine process exited with code {self.process.exitcode}")


# ---- the engine process ----

class _PipeCommands:
    """Commands from the pipe, as `queue.Queue.get` gives them; a closed pipe reads as Stop."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        try:
            if not self._conn.poll(timeout if block else 0):
                raise queue.Empty
            return self._conn.recv()
        except (EOFError, ConnectionResetError, BrokenPipeError):
            return Stop()  # the API process is gone


def _compile_again(grammars: Any) -> Callable[[PreparedRequest], PreparedRequest]:
    """The request with its grammar compiled again from its spec (see the module doc)."""

    def prepare(request: PreparedRequest) -> PreparedRequest:
        spec = request.params.structured_output
        if spec is None or request.grammar is not None:
            return request
        if grammars is None:
            raise ValueError("this engine has no structured output (grammar) support")
        return replace(request, grammar=grammars.compile(spec))

    return prepare


def _portable(error: BaseException) -> BaseException:
    """`error`, or an exception of the same meaning that survives pickling (a ValueError stays a
    400, anything else a 500)."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - an exception class with a custom __init__
        cls = ValueError if isinstance(error, ValueError) else RequestFailedError
        return cls(str(error))


def _encode(deltas: list[RequestDelta | TokenRow]) -> tuple:
    """A step's output as one pipe message: the deltas as plain tuples, the TokenRows as they
    are."""
    items, rows = [], []
    for d in deltas:
        if type(d) is tuple:
            rows.append(d)
        else:
            items.append((d.request_id, d.finished, d.num_cached_tokens, d.time,
                          [(s.index, s.text, s.token_ids, s.logprobs, s.finish_reason,
                            s.stop_reason) for s in d.samples]))
    return ("step", time.monotonic(), items, rows)


def _engine_process_main(factory: Callable[[], Any], commands: Connection, outputs: Connection,
                         log_level: str) -> None:
    guard_child_process("hearth-engine")  # signals to the group ignored, dies with the server
    logging.basicConfig(  # the API process's format, marked as the engine process's lines
        level=log_level.upper(), format="%(asctime)s engine %(levelname)s %(name)s: %(message)s")
    try:
        engine = factory()
    except BaseException as error:  # noqa: BLE001 - reported; the server exits non-zero
        logger.error("could not load the model: %s", error,
                     exc_info=not isinstance(error, ValueError))
        outputs.send(("dead", _portable(error)))
        return
    try:
        token_rows = hasattr(engine, "emit_token_ids")  # plain requests: text in the API process
        if token_rows:
            engine.emit_token_ids = True
        outputs.send(("ready", engine.model_info, token_rows))
        from hearth.appliance.gc_heap import freeze_heap

        freeze_heap()  # the loaded model's heap, out of every later collection's walk
        loop = EngineLoop(
            _PipeCommands(commands),
            emit=lambda deltas: outputs.send(_encode(deltas)),
            fail=lambda request_id, error: outputs.send(("fail", request_id, _portable(error))),
            on_snapshot=lambda snapshot: outputs.send(("snapshot", snapshot)),
            prepare=_compile_again(engine.model_info.grammars),
        )
        loop.run(engine)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the API process is gone
    except BaseException as error:  # noqa: BLE001
        logger.critical("the engine process's loop died", exc_info=error)
        try:
            outputs.send(("dead", _portable(error)))
        except OSError:
            pass
    finally:
        try:
            engine.shutdown()
        except Exception:  # noqa: BLE001 - exiting anyway
            logger.exception("engine shutdown failed")
