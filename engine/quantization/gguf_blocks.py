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

On CUDA, GGUFLinear repacks all five exactly into the int layout (`to_int_layout`); the block
kernel kernels/quant/gguf_gemm.py reads them in place (it declares the same geometry; a test checks
that it equals BLOCKS). The torch code here is the reference of both.

Rows are independent, so fused projections concatenate rows and llama.cpp's Q/K row permutation
is undone by permuting whole rows, bytes untouched. The references follow gguf-py's numpy
dequantizers op for op (float32), so the kept-quantized CPU path gives the same float weights.
"""

from __future__ import annotations

import torch

from hearth.engine.quantization.int_layout import pack

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


def f16(b: torch.Tensor) -> torch.Tensor:  # (n, 2) uint8 → (n, 1) float32
    return b.contiguous().view(torch.float16).float()


def nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """(n, m) bytes → (n, 2m) values: each run of `group` bytes gives its low then high nibbles."""
    n = qs.shape[0]
    qs = qs.reshape(n, -1, 1, group)
    shifts = torch.tensor([0, 4], dtype=torch.uint8, device=qs.device).reshape(1, 1, 2, 1)
    return ((qs >> shifts) & 0x0F).reshape(n, -1)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = f16(b[:, :2])
    q = nibbles(b[:, 2:], 16).to(torch.int8) - 8
    return d * q.float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = f16(b[:, :2]), f16(b[:, 2:4])
    return d * nibbles(b[:, 4:], 16).float() + m


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return f16(b[:, :2]) * b[:, 2:].contiguous().view(torch.int8).float()


def _q4_k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes → 8 six-bit scales and 8 six-bit mins (llama.cpp get_scale_min_k4)."""
    s = s.reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn  # (n, 8) each


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = f16(b[:, :2]), f16(b[:, 2:4])
    sc, mn = _q4_k_scales(b[:, 4:16])
    d = (d * sc.float()).reshape(n, -1, 1)  # (n, 8, 1)
    dm = (dmin * mn.float()).reshape(n, -1, 1)
    q = nibbles(b[:, 16:], 32).reshape(n, -1, 32).float()
    return (d * q - dm).reshape(n, 256)


def _q6_k_quants(b: torch.Tensor) -> torch.Tensor:
    """(n, 210) blocks -> (n, 256) unsigned 6-bit quants (0..63)."""
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    low = ((ql.reshape(n, -1, 1, 64) >> torch.tensor([0, 4], dtype=torch.uint8,
                                                       device=b.device).reshape(1, 1, 2, 1)) & 0x0F)
    low = low.reshape(n, -1, 32)
    high = qh.reshape(n, -1, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8,
                                                    device=b.device).reshape(1, 1, 4, 1)
    high = (high & 0x03).reshape(n, -1, 32)
    return (low | (high << 4)).reshape(n, 256)


def _q6_k_scales(b: torch.Tensor) -> torch.Tensor:
    """(n, 210) blocks -> (n, 16) float32 d * scale of each 16 weights."""
    return f16(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).float()


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    q = _q6_k_quants(b).to(torch.int8) - 32
    return (_q6_k_scales(b).reshape(n, 16, 1) * q.reshape(n, 16, -1).float()).reshape(n, 256)


# On CUDA these types are repacked exactly into the int layout (int_layout.py) and run on the
# int kernels: (group size, bits, offset). Offset types hold w = q s + b (b in `zeros`).
INT_LAYOUT_TYPES = {"Q4_0": (32, 4, False), "Q8_0": (32, 8, False), "Q4_1": (32, 4, True),
                    "Q4_K": (32, 4, True), "Q6_K": (16, 8, False)}


def _int_parts(b: torch.Tensor, qtype: str):
    """(n, size) blocks -> unsigned quants (n, B) uint8, scales (n, B // group) and zeros (the
    integer zero point, or the float offset b of offset types), matching the references."""
    if qtype == "Q4_0":
        return nibbles(b[:, 2:], 16), f16(b[:, :2]), 8
    if qtype == "Q8_0":
        q = (b[:, 2:].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
        return q, f16(b[:, :2]), 128
    if qtype == "Q4_1":
        return nibbles(b[:, 4:], 16), f16(b[:, :2]), f16(b[:, 2:4])
    if qtype == "Q4_K":
        sc, mn = _q4_k_scales(b[:, 4:16])
        return (nibbles(b[:, 16:], 32), f16(b[:, :2]) * sc.float(),
                -(f16(b[:, 2:4]) * mn.float()))
    return _q6_k_quants(b), _q6_k_scales(b), 32  # Q6_K: (q - 32) d sc


def to_int_layout(raw: torch.Tensor, qtype: str, cols: int):
    """GGUF rows (N, row_bytes) -> the int layout, exactly: (qweight (K // pack, N) int32,
    zeros (K // group, N), scales (K // group, N), bits, group, offset). zeros is uint8 (Q4_0:
    8, Q8_0: 128, Q6_K: 32) or, for offset types, the float offsets (Q4_1: m, Q4_K: -dmin mn);
    scales are d (float16) or d * sub-block scale (float32, K-quants)."""
    if qtype not in INT_LAYOUT_TYPES:
        raise ValueError(f"{qtype} has no int layout; supported: {', '.join(INT_LAYOUT_TYPES)}")
    group, bits, offset = INT_LAYOUT_TYPES[qtype]
    size = _block(qtype)[1]
    n = raw.shape[0]
    q, scales, zeros = _int_parts(raw.reshape(-1, size), qtype)
    scales = scales.reshape(n, cols // group)
    if scales.dtype == torch.float32 and qtype in ("Q4_0", "Q8_0", "Q4_1"):
        scales = scales.half()  # exactly the file's float16 d
    if isinstance(zeros, int):
        zeros = torch.full(scales.shape, zeros, dtype=torch.uint8, device=raw.device)
    else:
        zeros = zeros.reshape(n, cols // group).to(scales.dtype)
    qweight = pack(q.reshape(n, cols).t().to(torch.int32), bits, dim=0)  # (K // pack, N)
    return qweight, zeros.t().contiguous(), scales.t().contiguous(), bits, group, offset


_DEQUANT = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q8_0": _q8_0, "Q4_K": _q4_k, "Q6_K": _q6_k}
