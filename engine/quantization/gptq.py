"""GPTQ checkpoints, AutoGPTQ / GPTQModel layout (checkpoint_format "gptq", or "gptq_v2").

Per linear with K inputs, N outputs, b bits, p = 32 // b values per word, G groups:

    qweight (K // p, N) int32   packed along the INPUT dim, sequential
    qzeros  (G, N // p) int32   packed along the output dim, sequential; format "gptq" (v1)
                                stores (zero - 1) mod 2**b (AutoGPTQ's quirk), "gptq_v2" the
                                zero itself
    scales  (G, N)      float16
    g_idx   (K,)        int32   the group of input channel k: k // g, or with desc_act (act-order)
                                any assignment; W^T[k, n] = (q[k, n] - z[g_idx[k], n]) * s[...]

Fused projections concatenate along N: qweight / scales by whole columns, qzeros by words (every
shard here is a multiple of p outputs). q/k/v (and gate/up) see the same inputs, so their g_idx
must be equal; the loader checks it.
"""

from __future__ import annotations

import torch

from hearth.engine.quantization.int_layout import pack, unpack

TENSORS = ("qweight", "qzeros", "scales", "g_idx")


def to_int_layout(name: str, tensor: torch.Tensor, bits: int, v2: bool) -> dict:
    if name == "qweight":
        return {"qweight": tensor}  # already the int layout
    if name == "qzeros":
        return {"zeros": _zeros(tensor, bits, v2).to(torch.uint8)}
    if name == "scales":
        return {"scales": tensor}
    if name == "g_idx":
        return {"g_idx": tensor.to(torch.int32)}
    raise ValueError(f"unexpected GPTQ tensor {name!r}; expected one of {', '.join(TENSORS)}")


def dequantize(qweight, qzeros, scales, g_idx, bits: int = 4, v2: bool = False) -> torch.Tensor:
    """Reference: the float weight W (N, K), float32."""
    q = unpack(qweight, bits, dim=0).float()  # (K, N)
    z = _zeros(qzeros, bits, v2).float()  # (G, N)
    g = g_idx.long()
    return ((q - z[g]) * scales.float()[g]).t().contiguous()


def _zeros(qzeros: torch.Tensor, bits: int, v2: bool) -> torch.Tensor:
    """Unpacked zero points; v1 stores zero - 1 modulo 2**bits, as AutoGPTQ's kernels read it."""
    z = unpack(qzeros, bits, dim=1)
    return z if v2 else (z + 1) & ((1 << bits) - 1)


def quantized_to_checkpoint(q, zeros, scales, g_idx, bits: int = 4) -> dict[str, torch.Tensor]:
    """Writer (format "gptq", v1): q (N, K) ints, zeros / scales (N, G), g_idx (K,)."""
    return {
        "qweight": pack(q.t().contiguous(), bits, dim=0),
        "qzeros": pack(((zeros - 1) & ((1 << bits) - 1)).t().contiguous(), bits, dim=1),
        "scales": scales.t().contiguous().to(torch.float16),
        "g_idx": g_idx.to(torch.int32).clone(),
    }
