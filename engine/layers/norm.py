"""RMSNorm, optionally fused with the residual add that precedes it in every decoder layer.

On CUDA one Triton kernel (kernels/fused.py) does add + norm in a single pass over the row; the CPU
path keeps the torch ops, in transformers' order. GemmaRMSNorm scales by (1 + w): it holds that
sum in float32, as transformers computes it (`1.0 + weight.float()`); the same kernel runs it."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without `residual`: rmsnorm(x). With it: (rmsnorm(x + residual), x + residual)."""
        if x.is_cuda:
            return self._fused(x, residual)
        if residual is not None:
            x = x + residual
            residual = x
        out = self._norm(x)
        return out if residual is None else (out, residual)

    def _fused(self, x: torch.Tensor, residual: torch.Tensor | None):
        from hearth.kernels.fused import rms_norm

        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (rows, hidden): per-head q/k norms flatten their heads
        if residual is None:
            return rms_norm(x2, self.weight, self.eps).view(shape)
        out, new_res = rms_norm(x2, self.weight, self.eps, residual.reshape(-1, shape[-1]))
        return out.view(shape), new_res.view(shape)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Same op order as transformers' LlamaRMSNorm: statistics in float32, cast back, then scale.
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class GemmaRMSNorm(RMSNorm):
    """Gemma's norm: x / rms(x) * (1 + w), all in float32, then cast (Gemma2RMSNorm). The
    parameter holds (1 + w) in float32; `load_offset_weight` takes a checkpoint's w."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(hidden_size, eps)
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=torch.float32))

    def load_offset_weight(self, w: torch.Tensor) -> None:
        self.weight.data.copy_(1.0 + w.float())

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight).to(x.dtype)
