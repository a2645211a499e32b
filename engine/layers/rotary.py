"""Rotary position embedding (neox / HF "rotate_half" layout), with llama3 frequency scaling.

The cos/sin table is computed once for every position up to max_position and indexed by the flat
positions tensor, so prefill chunks and decode tokens of many sequences rotate in one call.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    # float32 throughout, as transformers computes it, so positions rotate bit-identically.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if kind in (None, "default"):
        return inv_freq
    if kind != "llama3":
        raise ValueError(f"unsupported rope scaling type {kind!r} (supported: default, llama3)")
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_mid, mid, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(
        self, head_dim: int, max_position: int, theta: float, scaling: dict | None = None
    ) -> None:
        super().__init__()
        inv_freq = _inv_freq(head_dim, theta, scaling)
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (max_position, head_dim // 2)
        # (max_position, head_dim): cos in the first half, sin in the second half
        self.register_buffer("cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], dim=-1),
                             persistent=False)
        self.head_dim = head_dim
        self._prepared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def prepare(self, positions: torch.Tensor, dtype: torch.dtype) -> None:
        """CPU: look up this forward pass's cos/sin once, for every layer that follows.

        The next `prepare` replaces them; layers use them only for this same `positions` object."""
        if positions.is_cuda:
            return
        cos, sin = self._cos_sin(positions)
        self._prepared = (positions, cos.to(dtype), sin.to(dtype))

    def _cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.cos_sin_cache[positions].chunk(2, dim=-1)  # (num_tokens, head_dim // 2)
        cos = torch.cat([cos, cos], dim=-1).unsqueeze(1)  # (num_tokens, 1, head_dim)
        sin = torch.cat([sin, sin], dim=-1).unsqueeze(1)
        return cos, sin

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: (num_tokens, num_heads, head_dim), k: (num_tokens, num_kv_heads, head_dim).

        On CUDA q and k are rotated in place by one Triton kernel (they may be views of qkv)."""
        if q.is_cuda:
            from hearth.kernels.fused import rotary_embedding

            rotary_embedding(positions, q, k, self.cos_sin_cache, self.head_dim)
            return q, k
        cos, sin = self._cpu_cos_sin(positions, q.dtype)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def rotate(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """CPU: x (num_tokens, heads, head_dim) rotated, out of place (q and k heads together)."""
        cos, sin = self._cpu_cos_sin(positions, x.dtype)
        return _rotate(x, cos, sin)

    def _cpu_cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        prepared = self._prepared
        if prepared is not None and prepared[0] is positions and prepared[1].dtype == dtype:
            return prepared[1], prepared[2]
        return self._cos_sin(positions)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    # Same op order as transformers (x * cos + rotate_half(x) * sin) in the input dtype.
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)
