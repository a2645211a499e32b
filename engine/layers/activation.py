"""SiLU-and-mul: the gated MLP activation over a fused gate_up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: (num_tokens, 2 * d) holding [gate | up] -> (num_tokens, d)."""
    if x.is_cuda and x.dim() == 2:
        from hearth.kernels.fused import silu_and_mul as fused

        return fused(x)
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]
