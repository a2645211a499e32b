"""Integer packing shared by AWQ, GPTQ and compressed-tensors: b-bit values in int32 words.

`32 // bits` values share one int32 along one dimension. Slot i of a word sits at bits
[i*bits, (i+1)*bits). Sequential packing (GPTQ, compressed-tensors) puts element j of the group in
slot j; AutoAWQ's GEMM layout interleaves, slot i holding element AWQ_ORDER[i]:

    word bits:   [31..28][27..24][23..20][19..16][15..12][11..8][7..4][3..0]
    sequential:     e7      e6      e5      e4      e3      e2    e1    e0
    AWQ:            e7      e5      e3      e1      e6      e4    e2    e0

Every quantized integer format is brought, at load time, to one layout the kernels read ("int
layout"): qweight (K // pack, N) int32 packed sequentially along K, zeros (G, N) uint8, scales
(G, N), g_idx (K,) int32 (the group of each input channel).
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_factor(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise ValueError(f"{bits}-bit packing is not supported; use 4 or 8 bits")
    return 32 // bits


def unpack(packed: torch.Tensor, bits: int, dim: int, order: tuple[int, ...] | None = None):
    """int32 words → unsigned b-bit values (int32), the packed dim growing by 32 // bits."""
    pack = pack_factor(bits)
    dim = dim % packed.dim()
    shifts = torch.arange(pack, device=packed.device, dtype=torch.int32) * bits
    shape = [1] * (packed.dim() + 1)
    shape[dim + 1] = pack
    values = (packed.unsqueeze(dim + 1) >> shifts.view(shape)) & ((1 << bits) - 1)
    if order is not None:  # slot i holds element order[i]: put element j back at j
        inverse = torch.tensor([order.index(j) for j in range(pack)], device=packed.device)
        values = values.index_select(dim + 1, inverse)
    new_shape = list(packed.shape)
    new_shape[dim] *= pack
    return values.reshape(new_shape)


def pack(values: torch.Tensor, bits: int, dim: int, order: tuple[int, ...] | None = None):
    """Unsigned b-bit values → int32 words along `dim` (its size must divide by 32 // bits)."""
    pack_n = pack_factor(bits)
    dim = dim % values.dim()
    if values.shape[dim] % pack_n:
        raise ValueError(f"cannot pack {values.shape[dim]} values along dim {dim} into words of "
                         f"{pack_n}")
    if values.min() < 0 or values.max() >= 1 << bits:
        raise ValueError(f"values must lie in [0, {(1 << bits) - 1}] to pack into {bits} bits")
    shape = list(values.shape)
    shape[dim : dim + 1] = [shape[dim] // pack_n, pack_n]
    grouped = values.to(torch.int32).reshape(shape)
    if order is not None:  # slot i takes element order[i]
        grouped = grouped.index_select(dim + 1, torch.tensor(order, device=values.device))
    words = grouped.select(dim + 1, 0).clone(memory_format=torch.contiguous_format)
    for i in range(1, pack_n):  # int32 shifts wrap into the sign bit, as packed words do
        words |= grouped.select(dim + 1, i) << (i * bits)
    return words


def dequantize_int_layout(
    qweight: torch.Tensor,  # (K // pack, N) int32
    zeros: torch.Tensor,  # (G, N)
    scales: torch.Tensor,  # (G, N)
    g_idx: torch.Tensor,  # (K,)
    bits: int,
    offset: bool = False,
) -> torch.Tensor:
    """Reference dequantization of the int layout: W^T (K, N) float32, W^T[k, n] =
    (q[k, n] - zeros[g_idx[k], n]) * scales[g_idx[k], n]; with `offset`, zeros holds float
    offsets b and W^T[k, n] = q[k, n] * scales[...] + b[...] (GGUF Q4_1 / Q4_K)."""
    q = unpack(qweight, bits, dim=0)  # (K, N)
    g = g_idx.long()
    if offset:
        return q.float() * scales.float()[g] + zeros.float()[g]
    return (q.float() - zeros.float()[g]) * scales.float()[g]


def default_g_idx(in_features: int, group_size: int | None, device=None) -> torch.Tensor:
    group = group_size or in_features
    return torch.arange(in_features, device=device, dtype=torch.int32) // group
