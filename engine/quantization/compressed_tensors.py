"""compressed-tensors "pack-quantized" checkpoints (what llm-compressor writes for W4A16 / W8A16).

Per linear with K inputs, N outputs, b bits, p = 32 // b, G groups (names end in `.weight_*`):

    weight_packed     (N, K // p) int32   packed along the INPUT dim, sequential, each value
                                          stored as q + 2**(b-1) (signed → unsigned)
    weight_scale      (N, G)      float   the model's dtype
    weight_zero_point (N // p, G) int32   asymmetric only: packed along the OUTPUT dim, + 2**(b-1)
    weight_shape      (2,)        int     [N, K]
    weight_g_idx      (K,)        int32   only with act-order "group"

    W[n, k] = (q[n, k] - z[n, g]) * s[n, g], both unsigned; symmetric: z = 2**(b-1).

Fused projections concatenate along N: rows of weight_packed / weight_scale, words of the zero
point (every shard here is a multiple of p outputs).
"""

from __future__ import annotations

import torch

from hearth.engine.quantization.int_layout import default_g_idx, pack, unpack

TENSORS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


def to_int_layout(name: str, tensor: torch.Tensor, bits: int, sym: bool) -> dict:
    if name == "weight_packed":
        q = unpack(tensor, bits, dim=1)  # (N, K)
        return {"qweight": pack(q.t().contiguous(), bits, dim=0)}
    if name == "weight_scale":
        return {"scales": tensor.t()}
    if name == "weight_zero_point":
        if sym:
            return {}  # some writers store zeros for symmetric weights; the offset is implied
        return {"zeros": unpack(tensor, bits, dim=0).t().to(torch.uint8)}
    if name == "weight_g_idx":
        return {"g_idx": tensor.to(torch.int32)}
    if name == "weight_shape":
        return {}  # checked against the layer's shape by the caller's buffer shapes
    raise ValueError(f"unexpected compressed-tensors tensor {name!r}; expected one of "
                     f"{', '.join(TENSORS)}")


def dequantize(weight_packed, weight_scale, bits: int = 4, weight_zero_point=None,
               group_size: int | None = None) -> torch.Tensor:
    """Reference: the float weight W (N, K), float32."""
    q = unpack(weight_packed, bits, dim=1).float()  # (N, K)
    if weight_zero_point is None:
        z = torch.full_like(weight_scale, 1 << (bits - 1), dtype=torch.float32)
    else:
        z = unpack(weight_zero_point, bits, dim=0).float()  # (N, G)
    g = default_g_idx(q.shape[1], group_size, q.device).long()
    return (q - z[:, g]) * weight_scale.float()[:, g]


def quantized_to_checkpoint(q, scales, bits: int = 4, zeros=None) -> dict[str, torch.Tensor]:
    """Writer (tests): q (N, K) unsigned ints, scales / zeros (N, G)."""
    out = {
        "weight_packed": pack(q, bits, dim=1),
        "weight_scale": scales.contiguous(),
        "weight_shape": torch.tensor(q.shape, dtype=torch.int64),
    }
    if zeros is not None:
        out["weight_zero_point"] = pack(zeros.contiguous(), bits, dim=0)
    return out
