"""What changes a batch's logits before sampling: each request's `logit_bias`, and the grammar
bitmask of constrained requests. Each is one op over the whole batch, and a batch that has
neither runs neither (unconstrained requests pay nothing).

    grammar bitmask, host (pinned)     (rows, words) int32, filled by engine/grammar.py while the
                                        forward pass runs on the device
        ── one non-blocking copy ──►  device
        ── apply_token_bitmask ──►    logits[r, t] = -inf where bit t % 32 of word t // 32 is 0
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from hearth.engine.sampling_params import SamplingParams

_NEG_INF = float("-inf")


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: logits (rows, >= vocab) float, bitmask (rows, words) int32 on the same device;
    the bitmask's 32 * words columns cover the vocabulary, later logit columns are padding."""
    rows, words = bitmask.shape
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).view(rows, words * 32)  # (rows, words*32)
    width = min(logits.shape[1], words * 32)
    logits[:, :width].masked_fill_(allowed[:, :width] == 0, _NEG_INF)


def apply_token_bitmask_ref(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Reference: a Python loop over rows and tokens (tests only)."""
    out = logits.clone()
    for r in range(bitmask.shape[0]):
        words = [int(w) & 0xFFFFFFFF for w in bitmask[r].tolist()]
        for t in range(min(out.shape[1], 32 * len(words))):
            if not (words[t // 32] >> (t % 32)) & 1:
                out[r, t] = _NEG_INF
    return out


def apply_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> None:
    """In place: add each row's logit_bias (token id -> value, checked by engine/prepare.py)."""
    rows: list[int] = []
    cols: list[int] = []
    values: list[float] = []
    for row, p in enumerate(params):
        if p.logit_bias:
            for token_id, value in p.logit_bias.items():
                rows.append(row)
                cols.append(token_id)
                values.append(value)
    if not rows:
        return
    device = logits.device
    index = (_to_device(rows, torch.int64, device), _to_device(cols, torch.int64, device))
    logits.index_put_(index, _to_device(values, torch.float32, device).to(logits.dtype),
                      accumulate=True)


class BitmaskBuffers:
    """A pinned host bitmask the matchers fill, reused every step, and its device copy."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.words = -(-vocab_size // 32)
        self.device = device
        self._pin = device.type == "cuda"
        self._host = torch.empty((0, self.words), dtype=torch.int32)

    def host(self, rows: int) -> Any:
        """(rows, words) int32 numpy view of the host buffer, for the matchers to fill."""
        if self._host.shape[0] < rows:
            self._host = torch.empty((max(rows, 2 * self._host.shape[0]), self.words),
                                     dtype=torch.int32, pin_memory=self._pin)
        return self._host[:rows].numpy()

    def to_device(self, rows: int) -> torch.Tensor:
        """The first `rows` rows on the device. On CUDA the copy does not block; the host
        buffer is refilled only after the sampler has read its ids back (a sync) next step."""
        host = self._host[:rows]
        if self.device.type != "cuda":
            return host
        return host.to(self.device, non_blocking=True)


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
