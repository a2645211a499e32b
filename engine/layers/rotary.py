"""Rotary position embedding (neox / HF "rotate_half" layout) over flat batches of positions.

The cos/sin table (engine/layers/rope_scaling.py: every scaling variant) is computed once for every
position up to max_position and indexed by the flat positions tensor, so prefill chunks and decode
tokens of many sequences rotate in one call. With partial rotary (Phi-4-mini) only the first
`rotary_dim` values of each head rotate; the rest pass through.
"""

from __future__ import annotations

import torch
from torch import nn

from hearth.engine.layers.rope_scaling import cos_sin_table
from hearth.engine.rope_config import RopeConfig


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, rope: RopeConfig | None = None) -> None:
        super().__init__()
        self.rope = rope or RopeConfig()
        self.head_dim, self.max_position = head_dim, max_position
        self.rotary_dim = self.rope.rotary_dim(head_dim)
        # (max_position, rotary_dim): cos in the first half, sin in the second half. Computed on
        # the CPU even inside the model builder's `torch.device("meta")`: meta arange runs
        # through torch's Python decompositions, which import torch._dynamo (1.3 s of a cold
        # start); the builder calls `rebuild` on the real device afterwards.
        with torch.device("cpu"):
            table = cos_sin_table(self.rope, head_dim, max_position)
        self.register_buffer("cos_sin_cache", table, persistent=False)
        self._prepared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def is_partial(self) -> bool:
        return self.rotary_dim != self.head_dim

    def rebuild(self, device: torch.device) -> None:
        """Compute the table again on `device` (it is never materialised on the meta device)."""
        self.cos_sin_cache = cos_sin_table(self.rope, self.head_dim, self.max_position).to(device)

    def prepare(self, positions: torch.Tensor, dtype: torch.dtype) -> None:
        """CPU: look up this forward pass's cos/sin once, for every layer that follows.

        The next `prepare` replaces them; layers use them only for this same `positions` object."""
        if positions.is_cuda:
            return
        cos, sin = self.cos_sin(positions)
        self._prepared = (positions, cos.to(dtype), sin.to(dtype))

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (num_tokens, 1, rotary_dim) for these positions (the native decode reads them
        too)."""
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

            rot = self.rotary_dim
            rotary_embedding(positions, q[..., :rot], k[..., :rot], self.cos_sin_cache, rot)
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
        return self.cos_sin(positions)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = cos.shape[-1]
    if rot != x.shape[-1]:  # partial rotary: the tail of each head passes through
        return torch.cat([_rotate(x[..., :rot], cos, sin), x[..., rot:]], dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    # Same op order as transformers (x * cos + rotate_half(x) * sin) in the input dtype.
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)
