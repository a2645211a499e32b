"""llama.cpp weights kept in their blocks (Q4_0 / Q4_1 / Q8_0, and the K-quants Q4_K / Q6_K):
out (M, N) = x (M, K) @ W^T, reading the blocks in place.

GGUFLinear does not use it: on CUDA it repacks every type exactly into the int layout at load,
which the int kernels read much faster at decode (per-element byte reads bound this kernel;
docs/benchmarks.md). It stays as the in-place path, for benchmarks and as a check of the block
formats on the GPU.

qweight is the raw (N, K // B * block_bytes) uint8 rows, B = 32 or 256 weights per block
(engine/quantization/gguf_blocks.py draws the layouts; `GGUF_KERNEL_TYPES` declares the geometry
this kernel decodes, and a test checks it against the format's table); the float16 d (and m,
dmin) of each block are rebuilt from their two bytes inside the kernel. Each program owns a
(BLOCK_M, BLOCK_N) output tile and dequantizes a (BLOCK_K, BLOCK_N) weight tile per step in fp32,
then tl.dot; every weight finds its block, scales and quant bits from its own index k, so any
BLOCK_K and split boundary works (the K-quants' per-element scale reads mostly hit L1). At M <= 16
split-K fills the GPU (fp32 partials summed afterwards):

    grid = (M tiles, N tiles, SPLIT_K)          K: |--split 0--|--split 1--|...|--split S-1--|

The launcher (blocks by M, split choice) is kernels/quant/quant_gemm.py's `launch`. The reference is
quant_gemm's `dequantized_matmul_ref` on gguf_blocks.dequantize's weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from hearth.kernels.quant.quant_gemm import check_x, launch, precision


@dataclass(frozen=True)
class KernelType:
    qtype: int  # the QTYPE constexpr
    block_weights: int  # weights per block
    block_bytes: int  # bytes per block


GGUF_KERNEL_TYPES = {
    "Q4_0": KernelType(0, 32, 18),
    "Q4_1": KernelType(1, 32, 20),
    "Q8_0": KernelType(2, 32, 34),
    "Q4_K": KernelType(3, 256, 144),
    "Q6_K": KernelType(4, 256, 210),
}


@triton.jit
def _f16_at(ptr, offs, mask):
    """The float16 stored little-endian at byte offsets `offs`, as float32."""
    lo = tl.load(ptr + offs, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + offs + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _q4_k_tile(w_ptr, base, j, mask):
    """Q4_K [d | dmin | 12 B scales | qs 128] at byte offsets `base`, weight j (0..255) of it.
    Sub-block s = j // 32 has a 6-bit scale and min (llama.cpp get_scale_min_k4): s < 4 in the
    low 6 bits of bytes 4+s / 8+s; s >= 4 in the nibbles of byte 12+s%4, high 2 bits on top of
    bytes 4+s%4 / 8+s%4. qs byte 32 * (j // 64) + j % 32: low nibble for even s, high for odd."""
    s = j // 32
    a = tl.load(w_ptr + base + 4 + s % 4, mask=mask, other=0)
    b = tl.load(w_ptr + base + 8 + s % 4, mask=mask, other=0)
    c = tl.load(w_ptr + base + 12 + s % 4, mask=mask, other=0)
    sc = tl.where(s >= 4, (c & 0xF) | ((a >> 2) & 0x30), a & 0x3F).to(tl.float32)
    mn = tl.where(s >= 4, (c >> 4) | ((b >> 2) & 0x30), b & 0x3F).to(tl.float32)
    byte = tl.load(w_ptr + base + 16 + (j // 64) * 32 + j % 32, mask=mask, other=0)
    q = ((byte >> ((s % 2) * 4).to(tl.uint8)) & 0xF).to(tl.float32)
    return _f16_at(w_ptr, base, mask) * sc * q - _f16_at(w_ptr, base + 2, mask) * mn


@triton.jit
def _q6_k_tile(w_ptr, base, j, mask):
    """Q6_K [ql 128 | qh 64 | 16 int8 scales | d], weight j (0..255): in half h = j // 128, the
    low 4 bits are a nibble of ql byte 64h + j % 64 (low for (j // 64) even), the high 2 bits
    pair (j // 32) % 4 of qh byte 128 + 32h + j % 32; q - 32 times scale j // 16 times d."""
    lo = tl.load(w_ptr + base + (j // 128) * 64 + j % 64, mask=mask, other=0)
    hi = tl.load(w_ptr + base + 128 + (j // 128) * 32 + j % 32, mask=mask, other=0)
    lo = (lo >> (((j // 64) % 2) * 4).to(tl.uint8)) & 0xF
    hi = (hi >> (((j // 32) % 4) * 2).to(tl.uint8)) & 0x3
    q = (lo | (hi << 4)).to(tl.float32) - 32.0
    sc = tl.load(w_ptr + base + 192 + j // 16, mask=mask, other=0).to(tl.int8, bitcast=True)
    return _f16_at(w_ptr, base + 208, mask) * sc.to(tl.float32) * q


@triton.jit
def _gguf_dequant_tile(w_ptr, rk, rn, K, N, row_bytes, QTYPE: tl.constexpr,
                       BLOCK_WEIGHTS: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    mask = (rk < K)[:, None] & (rn < N)[None, :]
    j = rk % BLOCK_WEIGHTS  # position in the block
    base = rn[None, :].to(tl.int64) * row_bytes + ((rk // BLOCK_WEIGHTS) * BLOCK_BYTES)[:, None]
    if QTYPE == 3:
        return _q4_k_tile(w_ptr, base, j[:, None], mask)
    if QTYPE == 4:
        return _q6_k_tile(w_ptr, base, j[:, None], mask)
    d = _f16_at(w_ptr, base, mask)  # (BK, BN)
    if QTYPE == 2:  # Q8_0: [d | 32 x int8]
        q = tl.load(w_ptr + base + 2 + j[:, None], mask=mask, other=0).to(tl.int8, bitcast=True)
        return q.to(tl.float32) * d
    header = 2 if QTYPE == 0 else 4
    byte = tl.load(w_ptr + base + header + (j % 16)[:, None], mask=mask, other=0)
    q = ((byte >> ((j // 16) * 4).to(tl.uint8)[:, None]) & 0xF).to(tl.float32)
    if QTYPE == 0:  # Q4_0: [d | 16 B]
        return d * (q - 8.0)
    return d * q + _f16_at(w_ptr, base + 2, mask)  # Q4_1: [d | m | 16 B]


@triton.jit
def _gguf_gemm_kernel(
    x_ptr, w_ptr, out_ptr, M, N, K, k_per_split, row_bytes, stride_xm, stride_os, stride_om,
    QTYPE: tl.constexpr, BLOCK_WEIGHTS: tl.constexpr, BLOCK_BYTES: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x_mask = (rm < M)[:, None] & (rk < k_end)[None, :]
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :], mask=x_mask,
                    other=0.0)
        w = _gguf_dequant_tile(w_ptr, rk, rn, k_end, N, row_bytes, QTYPE, BLOCK_WEIGHTS,
                               BLOCK_BYTES)
        acc += tl.dot(x, w.to(x.dtype), input_precision=PRECISION)
    out_mask = (rm < M)[:, None] & (rn < N)[None, :]
    offs = pid_s * stride_os + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def gguf_matmul(x: torch.Tensor, qweight: torch.Tensor, qtype: str,
                split_k: int | None = None) -> torch.Tensor:
    """x (M, K) @ W^T with W (N, K) in llama.cpp blocks → (M, N) in x's dtype."""
    if qtype not in GGUF_KERNEL_TYPES:
        raise ValueError(f"no kernel for GGUF type {qtype}; supported: "
                         f"{', '.join(GGUF_KERNEL_TYPES)} (others: dequantize, then F.linear)")
    check_x(x)
    M, K = x.shape
    kind = GGUF_KERNEL_TYPES[qtype]
    block, block_bytes = kind.block_weights, kind.block_bytes
    if K % block:
        raise ValueError(f"{qtype} packs {block} weights per block: K must be a multiple of "
                         f"{block}, got K={K}")
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or \
            qweight.shape[1] != K // block * block_bytes:
        raise ValueError(f"{qtype} weight for K={K} must be (N, {K // block * block_bytes}) "
                         f"uint8; got {tuple(qweight.shape)} {qweight.dtype}")
    if qweight.device != x.device or not qweight.is_contiguous():
        raise ValueError(f"qweight must be contiguous and on x's device ({x.device})")
    N = qweight.shape[0]
    return launch(x, N, K, split_k, lambda out, grid, k_split, blocks: _gguf_gemm_kernel[grid](
        x, qweight, out, M, N, K, k_split, qweight.stride(0), x.stride(0),
        out.stride(0), out.stride(1),
        QTYPE=kind.qtype, BLOCK_WEIGHTS=block, BLOCK_BYTES=block_bytes,
        PRECISION=precision(x),
        **blocks,
    ))
