"""Decode CUDA graphs: the model's forward and LM head for a decode-only batch, captured once per
padded batch size and replayed with new inputs copied into static buffers.

    batch of 5 decode rows -> padded to the captured size 8:
        input_ids   [t0 t1 t2 t3 t4 | 0  0  0 ]
        positions   [p0 p1 p2 p3 p4 | 0  0  0 ]
        slot_mapping[s0 s1 s2 s3 s4 | -1 -1 -1]   -1: write_kv skips the row (nothing written)
        seq_lens    [l0 l1 l2 l3 l4 | 0  0  0 ]   0: attention reads nothing, outputs zeros
        block_tables rows 0..4 filled; padding rows never read

The attention kernels take every length from device tensors (no host sync), and the decode split
count depends only on the block-table width, which is fixed: so one capture serves every step.
Batches larger than the largest captured size, or with prefill rows, run eagerly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from hearth.engine.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, then every 16: padding wastes at most ~1/8 of a step."""
    sizes = [1, 2, 4] + list(range(8, 65, 8)) + list(range(80, max(max_num_seqs, 64) + 16, 16))
    capped = sorted({min(s, max_num_seqs) for s in sizes})
    return capped


@dataclass
class DecodeInputs:
    """Host (pinned) arrays of one decode step, `num_seqs` valid rows."""

    num_seqs: int
    input_ids: torch.Tensor  # (>= num_seqs,) int64
    positions: torch.Tensor  # (>= num_seqs,) int64
    slot_mapping: torch.Tensor  # (>= num_seqs,) int64
    seq_lens: torch.Tensor  # (>= num_seqs,) int32
    block_tables: torch.Tensor  # (>= num_seqs, max_blocks) int32


class DecodeGraphs:
    """Captured decode forwards, one per batch size, sharing one memory pool and static inputs."""

    def __init__(self, model: torch.nn.Module, kv_caches, backend, max_num_seqs: int,
                 max_blocks: int, block_size: int) -> None:
        self.model, self.kv_caches, self.backend = model, kv_caches, backend
        self.block_size = block_size
        self.sizes = graph_batch_sizes(max_num_seqs)
        device = next(model.parameters()).device
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @property
    def max_batch_size(self) -> int:
        return self.sizes[-1]

    def _meta(self, size: int) -> AttentionMetadata:
        max_len = self.block_tables.shape[1] * self.block_size
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            query_lens_cpu=[1] * size,
            seq_lens_cpu=[max_len] * size,  # an upper bound; the Triton decode path never reads it
            max_query_len=1,
            max_seq_len=max_len,
        )

    def _forward(self, size: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:size], self.positions[:size], self.kv_caches,
                            self._meta(size), self.backend)
        return self.model.compute_logits(hidden)  # (size, vocab)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture the largest size first, so the smaller ones reuse its pool."""
        pool = None
        for size in reversed(self.sizes):
            self._forward(size)  # compile kernels and warm allocators outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(size)
            pool = graph.pool() if pool is None else pool
            self.graphs[size] = graph
        torch.cuda.synchronize()
        logger.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def padded_size(self, num_seqs: int) -> int | None:
        for size in self.sizes:
            if size >= num_seqs:
                return size
        return None

    def run(self, inputs: DecodeInputs) -> torch.Tensor:
        """Copy the step's inputs into the static buffers, replay -> logits (num_seqs, vocab)."""
        self.load(inputs)
        return self.replay(inputs.num_seqs)

    def load(self, inputs: DecodeInputs) -> None:
        """Copy the step's inputs into the static buffers (non-blocking, from pinned memory)."""
        n = inputs.num_seqs
        size = self._size(n)
        self.input_ids[:n].copy_(inputs.input_ids[:n], non_blocking=True)
        self.positions[:n].copy_(inputs.positions[:n], non_blocking=True)
        self.slot_mapping[:n].copy_(inputs.slot_mapping[:n], non_blocking=True)
        self.seq_lens[:n].copy_(inputs.seq_lens[:n], non_blocking=True)
        self.block_tables[:n].copy_(inputs.block_tables[:n], non_blocking=True)
        if size > n:  # padding rows: write nothing, read nothing
            self.slot_mapping[n:size].fill_(-1)
            self.seq_lens[n:size].zero_()

    def replay(self, num_seqs: int) -> torch.Tensor:
        """Replay on the loaded buffers -> logits (num_seqs, vocab)."""
        size = self._size(num_seqs)
        self.graphs[size].replay()
        return self.outputs[size][:num_seqs]

    def _size(self, num_seqs: int) -> int:
        size = self.padded_size(num_seqs)
        if size is None:
            raise ValueError(
                f"batch of {num_seqs} exceeds the largest captured size {self.sizes[-1]}"
            )
        return size
