"""Tensor-parallel worker processes: started (multiprocessing spawn), supervised and stopped by
the engine in the main process.

- A worker loads its share of the model, joins the process group and runs the driver's steps.
- A worker that dies unexpectedly is logged once, with its rank, pid and exit code; the driver's
  next step (or its idle health check) raises, which runs the engine-death path (/health 503,
  exit non-zero, systemd restarts the service).
- Workers ignore SIGINT / SIGTERM / SIGHUP (the main process drains, then stops them) and die with
  the main process (PR_SET_PDEATHSIG on Linux), so no worker outlives the service
  (engine/child_process.py).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import threading
from collections.abc import Callable

from hearth.engine.child_process import guard_child_process
from hearth.engine.config import EngineConfig
from hearth.engine.distributed.communicator import CommConfig

logger = logging.getLogger(__name__)


class WorkerGroup:
    """The worker processes of ranks 1..world_size - 1."""

    def __init__(self, config: EngineConfig, comm: CommConfig,
                 entry: Callable[[EngineConfig, CommConfig], None]) -> None:
        """`entry`: what a worker runs (a module-level function: spawn pickles it by name)."""
        ctx = multiprocessing.get_context("spawn")
        self.failure: str | None = None
        self._stopping = False
        self.processes = [
            ctx.Process(target=_bootstrap, args=(entry, config, _for_rank(comm, rank)),
                        name=f"hearth-tp-{rank}", daemon=True)
            for rank in range(1, comm.world_size)]
        for process in self.processes:
            process.start()
        self._monitor = threading.Thread(target=self._watch, name="hearth-tp-supervisor",
                                         daemon=True)
        self._monitor.start()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def _watch(self) -> None:
        sentinels = {p.sentinel: (rank, p) for rank, p in enumerate(self.processes, start=1)}
        ready = multiprocessing.connection.wait(list(sentinels))
        if self._stopping:
            return
        rank, process = sentinels[ready[0]]
        process.join(1.0)  # its exit code
        self.failure = (f"tensor-parallel worker rank {rank} (pid {process.pid}) exited with "
                        f"code {process.exitcode}; the engine stops")
        logger.critical(self.failure)

    def all_alive(self) -> bool:
        return self.failure is None and all(p.is_alive() for p in self.processes)

    def check(self) -> None:
        """RuntimeError if a worker has died (the engine-death path takes it from there)."""
        if self.failure is not None:
            raise RuntimeError(self.failure)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Wait for the workers to leave their loops (after the driver's STOP); kill stragglers."""
        self._stopping = True
        for process in self.processes:
            process.join(timeout_s)
            if process.is_alive():
                logger.warning("tensor-parallel worker pid %d did not stop; killing it",
                               process.pid)
                process.kill()
                process.join(timeout_s)


def _for_rank(comm: CommConfig, rank: int) -> CommConfig:
    return CommConfig(rank, comm.world_size, comm.init_method, comm.backend, comm.timeout_s)


def _bootstrap(entry: Callable[[EngineConfig, CommConfig], None], config: EngineConfig,
               comm_config: CommConfig) -> None:
    """A worker process: signals and parent-death first, then `entry` (model_builder's
    run_tp_worker: its share of the model, then the driver's steps until STOP)."""
    guard_child_process()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp{comm_config.rank} "
                        "%(levelname)s %(name)s: %(message)s")
    entry(config, comm_config)
