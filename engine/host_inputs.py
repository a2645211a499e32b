"""A step's inputs on the host: HostBuffers (input arrays reused every step, pinned on CUDA)
and StepBatch (one step's layout over them), built from the scheduled chunks with numpy for
the ModelRunner (engine/model_runner.py) and the tensor-parallel driver."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from hearth.engine.cuda_graphs import DecodeInputs
from hearth.engine.outputs import ScheduledChunk
from hearth.engine.scheduler import PLACEHOLDER_TOKEN_ID


@dataclass
class StepBatch:
    """One step's layout on the host; the token arrays live in HostBuffers."""

    num_seqs: int
    num_tokens: int
    query_lens: np.ndarray  # (num_seqs,) int64
    seq_lens: np.ndarray  # (num_seqs,) int64: context after this step
    host: HostBuffers

    @property
    def decode_only(self) -> bool:
        return self.num_tokens == self.num_seqs

    @cached_property
    def placeholder_rows(self) -> np.ndarray:
        """Rows whose input token is still a placeholder (async scheduling: sampled by the step
        before, on the device)."""
        return np.flatnonzero(self.host.input_ids.numpy()[: self.num_tokens]
                              == PLACEHOLDER_TOKEN_ID)

    def sample_rows(self, chunks: list[ScheduledChunk], stride: int = 0) -> np.ndarray:
        """Rows whose logits are read: each sampled chunk's last, or its last K + 1 when it
        verifies K proposals. stride > 0: in a verification graph's layout, where sequence i's
        rows start at i * stride (engine/cuda_graphs.py)."""
        if stride:
            ends = np.arange(self.num_seqs) * stride + self.query_lens
        else:
            ends = np.cumsum(self.query_lens)
        counts = np.fromiter((c.num_sampled_rows for c in chunks), np.int64, len(chunks))
        if counts.max(initial=0) <= 1:
            return (ends - 1)[counts.astype(bool)]
        firsts = np.repeat(ends - counts, counts)
        return firsts + np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)

    def decode_inputs(self) -> DecodeInputs:
        h = self.host
        return DecodeInputs(self.num_seqs, h.input_ids, h.positions, h.slot_mapping,
                            h.seq_lens, h.block_tables, self.query_lens)


class HostBuffers:
    """Host-side input arrays, reused every step (pinned on CUDA so copies do not block).

    Refilling waits for the last step's host-to-device copies (an event recorded right after
    them, not after the forward): with async scheduling the next step is built while the GPU may
    not have reached this step's copies yet."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, pin: bool) -> None:
        self.pin = pin and torch.cuda.is_available()
        self.max_blocks = max_blocks
        self.rope_offset = 0  # added to the positions of `rope_long` sequences (longrope)
        self._copied = torch.cuda.Event() if self.pin else None
        self._alloc_tokens(max(max_tokens, max_seqs))
        self._alloc_seqs(max_seqs)

    def _tensor(self, shape, dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, pin_memory=self.pin)

    def _alloc_tokens(self, n: int) -> None:
        self.input_ids = self._tensor(n, torch.int64)
        self.positions = self._tensor(n, torch.int64)
        self.slot_mapping = self._tensor(n, torch.int64)
        self._np_tokens = (
            self.input_ids.numpy(), self.positions.numpy(), self.slot_mapping.numpy()
        )

    def _alloc_seqs(self, n: int) -> None:
        self.seq_lens = self._tensor(n, torch.int32)
        self.query_start_loc = self._tensor(n + 1, torch.int32)
        self.block_tables = self._tensor((n, self.max_blocks), torch.int32)
        self._np_seqs = (self.seq_lens.numpy(), self.query_start_loc.numpy(),
                         self.block_tables.numpy())
        self._row_owner: list[tuple[list[int] | None, int]] = [(None, 0)] * n  # (block list, width)

    def _fill_tables(self, chunks: list[ScheduledChunk], widths: list[int], bs: int) -> None:
        """Block-table rows, rewriting only what may have changed since the last step. A row that
        keeps the same block list object (free / prefix attach replace it) changes only from the
        block this step writes into (copy-on-write) onwards: in steady decoding, one entry."""
        tables, owners = self._np_seqs[2], self._row_owner
        for i, (c, w) in enumerate(zip(chunks, widths, strict=True)):
            ids = c.seq.block_ids
            owner, written = owners[i]
            first = 0 if owner is not ids else min(written, c.start_pos // bs)
            tables[i, first:w] = ids[first:w]
            owners[i] = (ids, w)

    def record_copies(self) -> None:
        if self._copied is not None:
            self._copied.record()

    def fill(self, chunks: list[ScheduledChunk], block_size: int) -> StepBatch:
        if self._copied is not None:
            self._copied.synchronize()
        n = len(chunks)
        starts = np.fromiter((c.start_pos for c in chunks), np.int64, n)
        query_lens = np.fromiter((c.num_new_tokens for c in chunks), np.int64, n)
        seq_lens = starts + query_lens
        t = int(query_lens.sum())
        widths = -(-seq_lens // block_size)  # blocks each sequence needs this step
        if t > self.input_ids.shape[0]:
            self._alloc_tokens(t)
        if n > self.seq_lens.shape[0] or int(widths.max()) > self.max_blocks:
            self.max_blocks = max(self.max_blocks, int(widths.max()))
            self._alloc_seqs(max(n, self.seq_lens.shape[0]))
        ids, pos, slots = self._np_tokens
        lens, qsl, tables = self._np_seqs
        lens[:n] = seq_lens
        qsl[0] = 0
        np.cumsum(query_lens, out=qsl[1 : n + 1])
        if t == n:  # decode only: one token per sequence, no per-token work
            ids[:n] = [c.seq.token_ids[c.start_pos] for c in chunks]
        else:
            ids[:t] = [tok for c in chunks for tok in c.token_ids]
        self._fill_tables(chunks, widths.tolist(), block_size)
        # (t,) position of each new token, and its slot through its sequence's block table
        row = np.repeat(np.arange(n), query_lens)
        pos[:t] = np.arange(t) - np.repeat(qsl[:n].astype(np.int64) - starts, query_lens)
        slots[:t] = tables[row, pos[:t] // block_size].astype(np.int64) * block_size
        slots[:t] += pos[:t] % block_size
        if self.rope_offset:  # from here on `pos` indexes the rotary table, no longer the cache
            long = np.fromiter((c.seq.rope_long for c in chunks), bool, n)
            if long.any():
                pos[:t] += np.repeat(long * self.rope_offset, query_lens)
        return StepBatch(n, t, query_lens, seq_lens, self)
