"""One step under tensor parallelism: the driver (rank 0) broadcasts the flat step inputs, every
rank runs the same forward (the collectives inside it pair up), and only the driver samples.

    driver:  schedule -> host batch -> broadcast StepInputs -> forward -> logits -> sample
    worker:                            receive StepInputs  -> forward -> logits (dropped)

The sampled tokens reach the workers as the next step's input ids. Steps run synchronously and
eagerly (no async scheduling, no CUDA graphs) when tensor_parallel_size > 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from hearth.engine.attention import AttentionMetadata
from hearth.engine.distributed.communicator import Communicator
from hearth.engine.model_runner import ModelRunner
from hearth.engine.outputs import ScheduleOutput

if TYPE_CHECKING:
    from hearth.engine.distributed.workers import WorkerGroup


@dataclass(frozen=True)
class StepInputs:
    """Everything a rank needs for one forward, as host arrays (picklable)."""

    input_ids: np.ndarray  # (num_tokens,) int64
    positions: np.ndarray  # (num_tokens,) int64
    slot_mapping: np.ndarray  # (num_tokens,) int64
    query_start_loc: np.ndarray  # (num_seqs + 1,) int32
    seq_lens: np.ndarray  # (num_seqs,) int32
    block_tables: np.ndarray  # (num_seqs, max_blocks) int32
    logit_rows: np.ndarray | None  # rows of the hidden states to compute logits for; None: all
    compute_logits: bool
    block_copies: tuple[tuple[int, int], ...] = ()  # (src, dst) copy-on-write blocks


STOP = "stop"  # the message that ends the workers' loops


class TensorParallelRunner(ModelRunner):
    """Rank 0's runner: a ModelRunner whose forward is shared with the workers."""

    def __init__(self, *args, comm: Communicator, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.comm = comm
        self.workers: WorkerGroup | None = None
        self._stopped = False

    def attach_workers(self, workers: WorkerGroup) -> None:
        self.workers = workers

    def check_health(self) -> None:
        if self.workers is not None:
            self.workers.check()

    def shutdown(self) -> None:
        """STOP to the workers (unless one died: then they are killed), wait, leave the group."""
        if self._stopped:
            return
        self._stopped = True
        alive = self.workers is None or self.workers.all_alive()
        if alive:
            try:
                self.comm.broadcast_object(STOP)
            except RuntimeError:  # a worker died meanwhile: stop() below kills the rest
                alive = False
        if self.workers is not None:
            self.workers.stop(timeout_s=10.0 if alive else 0.0)
        self.comm.shutdown()

    def _forward(self, schedule: ScheduleOutput, prev):
        self.check_health()
        if prev is not None:
            raise RuntimeError("tensor parallelism runs synchronous steps (no async scheduling)")
        copies = tuple((c.src, c.dst) for c in schedule.block_copies)
        chunks = schedule.chunks
        if not chunks:
            if copies:
                self._run(_copies_only(copies))
            return None, []
        batch = self._host.fill(chunks, self.block_size)
        sampled = [c for c in chunks if c.samples]
        rows = None
        if len(sampled) != len(chunks) or batch.num_tokens != len(chunks):
            rows = batch.sample_rows(chunks)
        n, t, h = batch.num_seqs, batch.num_tokens, self._host
        step = StepInputs(
            h.input_ids[:t].numpy().copy(), h.positions[:t].numpy().copy(),
            h.slot_mapping[:t].numpy().copy(), h.query_start_loc[: n + 1].numpy().copy(),
            h.seq_lens[:n].numpy().copy(), h.block_tables[:n].numpy().copy(), rows,
            bool(sampled), copies)
        return self._run(step), sampled

    def _run(self, step: StepInputs) -> torch.Tensor | None:
        self.comm.broadcast_object(step)
        return run_step(self, step)


def _copies_only(copies) -> StepInputs:
    empty = np.zeros(0, dtype=np.int64)
    return StepInputs(empty, empty, empty, empty.astype(np.int32), empty.astype(np.int32),
                      np.zeros((0, 1), dtype=np.int32), None, False, copies)


@torch.inference_mode()
def run_step(runner: ModelRunner, step: StepInputs) -> torch.Tensor | None:
    """The forward every rank runs: block copies, the model, then the sampled rows' logits."""
    dev = runner.device
    if step.block_copies:
        src, dst = (torch.tensor(x, device=dev) for x in zip(*step.block_copies, strict=True))
        for layer in runner.kv_caches:
            layer.copy_blocks(src, dst)
    if step.input_ids.size == 0:
        return None
    query_lens = np.diff(step.query_start_loc)
    meta = AttentionMetadata(
        slot_mapping=torch.from_numpy(step.slot_mapping).to(dev),
        query_start_loc=torch.from_numpy(step.query_start_loc).to(dev),
        seq_lens=torch.from_numpy(step.seq_lens).to(dev),
        block_tables=torch.from_numpy(step.block_tables).to(dev),
        query_lens_cpu=query_lens.tolist(), seq_lens_cpu=step.seq_lens.tolist(),
        max_query_len=int(query_lens.max()), max_seq_len=int(step.seq_lens.max()))
    input_ids = torch.from_numpy(step.input_ids).to(dev)
    positions = torch.from_numpy(step.positions).to(dev)
    hidden = runner.model(input_ids, positions, runner.kv_caches, meta, runner.backend)
    if not step.compute_logits:
        return None
    if step.logit_rows is not None:
        hidden = hidden[torch.from_numpy(step.logit_rows).to(dev)]
    return runner.model.compute_logits(hidden)  # (rows, vocab), gathered over the ranks


def worker_loop(runner: ModelRunner, comm: Communicator) -> None:
    """A worker's life after loading: run each step the driver broadcasts, until STOP."""
    while True:
        step = comm.broadcast_object(None)
        if isinstance(step, str):  # STOP
            return
        run_step(runner, step)
