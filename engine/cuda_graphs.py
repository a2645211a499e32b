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

Verification graphs (speculative decoding): `query_len` = K + 1 rows per sequence, so a step that
verifies K proposals replays a graph too instead of ~300 eager launches. Every sequence owns K + 1
rows; one with fewer new tokens (a shorter proposal, or a plain decode row beside the speculating
ones) is padded at its end, and its seq_len is raised by the padding so its real rows keep their
positions (the prefill kernel puts query j of a sequence at seq_len - query_len + j):

    K = 3, rows per sequence 4:  seq A proposes 3, seq B 1, seq C none
        input_ids    [a a1 a2 a3 | b b1 0  0  | c 0  0  0 ]
        slot_mapping [s s  s  s  | s s  -1 -1 | s -1 -1 -1]   padding writes nothing
        seq_lens     [lA         | lB + 2     | lC + 3    ]   real rows at their own positions
        positions of padding rows: 0 (the rotary table is only read there)

Causal masking keeps each real row from the padding's keys after it; padding rows read whatever
the block table holds there (a valid block: the table has room for K more positions) and their
logits are never read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from hearth.engine.attention import AttentionMetadata

logger = logging.getLogger(__name__)

# Verification graphs are captured for at most this many rows (sequences x (K + 1)): their
# logits buffer is rows x vocab, and speculation pays only at small batches anyway.
MAX_VERIFY_ROWS = 512


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
    # new tokens per sequence, flat in input_ids (verification graphs); None: one each (decode)
    query_lens: np.ndarray | None = None


class DecodeGraphs:
    """Captured decode forwards, one per batch size, sharing one memory pool and static inputs.
    `query_len` > 1: verification graphs, `query_len` rows per sequence (module docstring)."""

    def __init__(self, model: torch.nn.Module, kv_caches, backend, max_num_seqs: int,
                 max_blocks: int, block_size: int, query_len: int = 1) -> None:
        self.model, self.kv_caches, self.backend = model, kv_caches, backend
        self.block_size = block_size
        self.query_len = q = query_len
        self.sizes = graph_batch_sizes(max_num_seqs)
        device = next(model.parameters()).device
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n * q, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n * q, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n * q,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        # padding rows may read up to q - 1 positions past a sequence's context (module docstring)
        extra = 0 if q == 1 else -(-(q - 1) // block_size) + 1
        self.block_tables = torch.zeros(n, max_blocks + extra, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(0, (n + 1) * q, q, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._staging = _Staging(n, q, device.type == "cuda") if q > 1 else None

    @property
    def max_batch_size(self) -> int:
        return self.sizes[-1]

    def _meta(self, size: int) -> AttentionMetadata:
        max_len = self.block_tables.shape[1] * self.block_size
        q = self.query_len
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[: size * q],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            query_lens_cpu=[q] * size,
            seq_lens_cpu=[max_len] * size,  # an upper bound; the Triton kernels never read it
            max_query_len=q,
            max_seq_len=max_len,
        )

    def _forward(self, size: int) -> torch.Tensor:
        rows = size * self.query_len
        hidden = self.model(self.input_ids[:rows], self.positions[:rows], self.kv_caches,
                            self._meta(size), self.backend)
        return self.model.compute_logits(hidden)  # (rows, vocab)

    def forward_eagerly(self, num_seqs: int) -> torch.Tensor:
        """What `replay` runs, without a graph, on the loaded buffers (the CPU tests check the
        padded layout through the Triton kernels in the interpreter with it)."""
        return self._forward(self._size(num_seqs))

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
        if self.query_len == 1:
            logger.info("captured decode CUDA graphs for batch sizes %s", self.sizes)
        else:
            logger.info("captured verification CUDA graphs (%d rows a sequence) for batch sizes %s",
                        self.query_len, self.sizes)

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
        if self.query_len > 1:
            self._load_padded(inputs)
            return
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

    def _load_padded(self, inputs: DecodeInputs) -> None:
        """Verification layout: sequence i's new tokens at rows i * q ..., padded to q rows."""
        n, q, lens = inputs.num_seqs, self.query_len, inputs.query_lens
        size = self._size(n)
        if lens is None or int(lens.max()) > q:
            raise ValueError(f"a verification graph takes at most {q} new tokens a sequence")
        t = int(lens.sum())
        starts = np.cumsum(lens) - lens  # first flat row of each sequence
        dst = np.repeat(np.arange(n) * q - starts, lens) + np.arange(t)
        stage = self._staging
        ids, pos, slots, seq_lens = stage.arrays
        rows = size * q
        ids[:rows], pos[:rows], slots[:rows] = 0, 0, -1
        ids[dst] = inputs.input_ids[:t].numpy()
        pos[dst] = inputs.positions[:t].numpy()
        slots[dst] = inputs.slot_mapping[:t].numpy()
        seq_lens[:n] = inputs.seq_lens[:n].numpy() + (q - lens)
        seq_lens[n:size] = q  # padding sequences: q rows over q keys of whatever block 0 holds
        self.input_ids[:rows].copy_(stage.input_ids[:rows], non_blocking=True)
        self.positions[:rows].copy_(stage.positions[:rows], non_blocking=True)
        self.slot_mapping[:rows].copy_(stage.slot_mapping[:rows], non_blocking=True)
        self.seq_lens[:size].copy_(stage.seq_lens[:size], non_blocking=True)
        width = inputs.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(inputs.block_tables[:n], non_blocking=True)

    def replay(self, num_seqs: int) -> torch.Tensor:
        """Replay on the loaded buffers -> logits (num_seqs * query_len, vocab): every row of a
        decode graph's sequences; a verification graph's padded layout, every row."""
        size = self._size(num_seqs)
        self.graphs[size].replay()
        return self.outputs[size][: num_seqs * self.query_len]

    def _size(self, num_seqs: int) -> int:
        size = self.padded_size(num_seqs)
        if size is None:
            raise ValueError(
                f"batch of {num_seqs} exceeds the largest captured size {self.sizes[-1]}"
            )
        return size


class _Staging:
    """Host buffers the verification layout is built in (pinned on CUDA), reused every step. The
    runner refills them only after the last step's copies (its HostBuffers event)."""

    def __init__(self, max_seqs: int, query_len: int, pin: bool) -> None:
        rows = max_seqs * query_len
        self.input_ids = torch.zeros(rows, dtype=torch.int64, pin_memory=pin)
        self.positions = torch.zeros(rows, dtype=torch.int64, pin_memory=pin)
        self.slot_mapping = torch.full((rows,), -1, dtype=torch.int64, pin_memory=pin)
        self.seq_lens = torch.zeros(max_seqs, dtype=torch.int32, pin_memory=pin)
        self.arrays = (self.input_ids.numpy(), self.positions.numpy(), self.slot_mapping.numpy(),
                       self.seq_lens.numpy())
