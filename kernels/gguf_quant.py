"""GGUF (llama.cpp) block quantization, kept in its block format: raw bytes, one row per output.

A weight (N, K) is stored as N rows of K // B blocks, each block B weights in `size` bytes
(d, m: float16; qs: packed quants; little-endian):

    Q4_0  B=32  18 B  [d | qs 16]        w = (q - 8) * d   q_j = qs[j] & 15, q_16+j = qs[j] >> 4
    Q4_1  B=32  20 B  [d | m | qs 16]    w = q * d + m        (same nibble order)
    Q8_0  B=32  34 B  [d | qs 32 int8]   w = q * d
    Q4_K  B=256 144 B [d | dmin | 12 B 6-bit scales/mins | qs 128]   8 sub-blocks of 32:
                      w = d * sc_s * q - dmin * m_s   (32 qs bytes: 32 low nibbles, 32 high)
    Q6_K  B=256 210 B [ql 128 | qh 64 | scales 16 int8 | d]           16 sub-blocks of 16:
                      w = d * sc_s * (q - 32)   (q: 4 bits from ql, 2 from qh)

All five have a Triton kernel (kernels/gguf_gemm.py); the torch code here is its reference.

Rows are independent, so fused projections concatenate rows and llama.cpp's Q/K row permutation
is undone by permuting whole rows, bytes untouched. The references follow gguf-py's numpy
dequantizers op for op (float32), so the kept-quantized CPU path gives the same float weights.
"""

from __future__ import annotations

import torch

BLOCKS = {  # type: (weights per block, bytes per block)
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q8_0": (32, 34),
    "Q4_K": (256, 144),
    "Q6_K": (256, 210),
}
# Byte offsets of each block's float16 scales (d, and m / dmin): what random test or benchmark
# blocks must set to stay finite.
SCALE_BYTES = {"Q4_0": (0,), "Q4_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}
KERNEL_TYPES = ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K")  # kernels/gguf_gemm.py reads these


def row_bytes(qtype: str, cols: int) -> int:
    block, size = _block(qtype)
    if cols % block:
        raise ValueError(f"{qtype} rows must be a multiple of {block} weights, got {cols}")
    return cols // block * size


def dequantize(raw: torch.Tensor, qtype: str, cols: int) -> torch.Tensor:
    """(rows, row_bytes) uint8 → (rows, cols) float32."""
    block, size = _block(qtype)
    rows = raw.shape[0]
    if raw.dtype != torch.uint8 or raw.shape[1] != row_bytes(qtype, cols):
        raise ValueError(f"{qtype}: expected ({rows}, {row_bytes(qtype, cols)}) uint8, got "
                         f"{tuple(raw.shape)} {raw.dtype}")
    blocks = raw.reshape(-1, size)  # (rows * cols // block, size)
    return _DEQUANT[qtype](blocks).reshape(rows, cols)


def _block(qtype: str) -> tuple[int, int]:
    if qtype not in BLOCKS:
        raise ValueError(f"GGUF type {qtype} cannot be kept quantized; supported: "
                         f"{', '.join(BLOCKS)}")
    return BLOCKS[qtype]


def _f16(b: torch.Tensor) -> torch.Tensor:  # (n, 2) uint8 → (n, 1) float32
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """(n, m) bytes → (n, 2m) values: each run of `group` bytes gives its low then high nibbles."""
    n = qs.shape[0]
    qs = qs.reshape(n, -1, 1, group)
    shifts = torch.tensor([0, 4], dtype=torch.uint8, device=qs.device).reshape(1, 1, 2, 1)
    return ((qs >> shifts) & 0x0F).reshape(n, -1)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:], 16).to(torch.int8) - 8
    return d * q.float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return d * _nibbles(b[:, 4:], 16).float() + m


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * b[:, 2:].contiguous().view(torch.int8).float()


def _q4_k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes → 8 six-bit scales and 8 six-bit mins (llama.cpp get_scale_min_k4)."""
    s = s.reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn  # (n, 8) each


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _q4_k_scales(b[:, 4:16])
    d = (d * sc.float()).reshape(n, -1, 1)  # (n, 8, 1)
    dm = (dmin * mn.float()).reshape(n, -1, 1)
    q = _nibbles(b[:, 16:], 32).reshape(n, -1, 32).float()
    return (d * q - dm).reshape(n, 256)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b[:, 208:210]) * scales).reshape(n, 16, 1)
    low = ((ql.reshape(n, -1, 1, 64) >> torch.tensor([0, 4], dtype=torch.uint8,
                                                       device=b.device).reshape(1, 1, 2, 1)) & 0x0F)
    low = low.reshape(n, -1, 32)
    high = qh.reshape(n, -1, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8,
                                                    device=b.device).reshape(1, 1, 4, 1)
    high = (high & 0x03).reshape(n, -1, 32)
    q = (low | (high << 4)).to(torch.int8) - 32
    return (d * q.reshape(n, 16, -1).float()).reshape(n, 256)


INT_LAYOUT_TYPES = ("Q4_0", "Q8_0")  # exactly (q - z) * d: CUDA runs them on the int kernels


def to_int_layout(raw: torch.Tensor, qtype: str, cols: int):
    """Q4_0 / Q8_0 rows (N, row_bytes) -> the int layout of kernels/int_pack.py with group size
    32: (qweight (K // pack, N) int32, zeros (K // 32, N) uint8, scales (K // 32, N) float16,
    bits). Exact: Q4_0 is (q - 8) d, Q8_0 is ((q + 128) - 128) d."""
    if qtype not in INT_LAYOUT_TYPES:
        raise ValueError(f"{qtype} has no exact int layout; supported: {INT_LAYOUT_TYPES}")
    block, size = _block(qtype)
    n = raw.shape[0]
    blocks = raw.reshape(n, cols // block, size)
    d = blocks[..., :2].contiguous().view(torch.float16)[..., 0]  # (N, K // 32)
    if qtype == "Q4_0":
        bits, zero = 4, 8
        qs = blocks[..., 2:]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-1)  # (N, K // 32, 32): low nibbles first
    else:
        bits, zero = 8, 128
        q = (blocks[..., 2:].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
    q = q.reshape(n, cols).t().to(torch.int32)  # (K, N)
    pack = 32 // bits
    q = q.reshape(cols // pack, pack, n)
    words = q[:, 0].clone()
    for i in range(1, pack):
        words |= q[:, i] << (i * bits)  # int32 shifts wrap into the sign bit, as packed words do
    zeros = torch.full_like(d, zero, dtype=torch.uint8).t().contiguous()
    return words.contiguous(), zeros, d.t().contiguous(), bits


_DEQUANT = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q8_0": _q8_0, "Q4_K": _q4_k, "Q6_K": _q6_k}
