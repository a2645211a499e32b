"""AWQ checkpoints, AutoAWQ's GEMM layout (what `version: "gemm"` checkpoints on the hub hold).

Per linear with K inputs, N outputs, group size g (all packed along the OUTPUT dim, AWQ_ORDER):

    qweight (K, N // 8)      int32   W^T[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n]
    qzeros  (K // g, N // 8) int32
    scales  (K // g, N)      float16

Fused projections concatenate along N, i.e. along the packed dim: a shard of n outputs is n // 8
words; every shard size here is a multiple of 8, so shards never share a word.
"""

from __future__ import annotations

import torch

from hearth.engine.quantization.int_layout import AWQ_ORDER, default_g_idx, pack, unpack

TENSORS = ("qweight", "qzeros", "scales")


def to_int_layout(name: str, tensor: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """One checkpoint tensor (one shard) → its pieces in the int layout (see int_layout)."""
    if name == "qweight":
        q = unpack(tensor, bits, dim=1, order=AWQ_ORDER)  # (K, N)
        return {"qweight": pack(q, bits, dim=0)}
    if name == "qzeros":
        return {"zeros": unpack(tensor, bits, dim=1, order=AWQ_ORDER).to(torch.uint8)}
    if name == "scales":
        return {"scales": tensor}
    raise ValueError(f"unexpected AWQ tensor {name!r}; expected one of {', '.join(TENSORS)}")


def dequantize(qweight, qzeros, scales, group_size: int, bits: int = 4) -> torch.Tensor:
    """Reference: the float weight W (N, K), float32, in nn.Linear's orientation."""
    q = unpack(qweight, bits, dim=1, order=AWQ_ORDER).float()  # (K, N)
    z = unpack(qzeros, bits, dim=1, order=AWQ_ORDER).float()  # (G, N)
    g = default_g_idx(q.shape[0], group_size, q.device).long()
    return ((q - z[g]) * scales.float()[g]).t().contiguous()


def quantized_to_checkpoint(q, zeros, scales, bits: int = 4) -> dict[str, torch.Tensor]:
    """Writer: q (N, K) ints, zeros / scales (N, G) → AWQ GEMM tensors."""
    return {
        "qweight": pack(q.t().contiguous(), bits, dim=1, order=AWQ_ORDER),
        "qzeros": pack(zeros.t().contiguous(), bits, dim=1, order=AWQ_ORDER),
        "scales": scales.t().contiguous().to(torch.float16),
    }
