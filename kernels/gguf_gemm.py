"""llama.cpp Q4_0 / Q4_1 / Q8_0 weights kept in their blocks: out (M, N) = x (M, K) @ W^T.

qweight is the raw (N, K // 32 * block_bytes) uint8 rows (kernels/gguf_quant.py); the float16 d
(and m) of each block are rebuilt from their two bytes inside the kernel. Each program owns a
(BLOCK_M, BLOCK_N) output tile and dequantizes a (BLOCK_K, BLOCK_N) weight tile per step in fp32,
then tl.dot; at M <= 16 split-K fills the GPU (fp32 partials summed afterwards):

    grid = (M tiles, N tiles, SPLIT_K)          K: |--split 0--|--split 1--|...|--split S-1--|

The launcher (blocks by M, split choice) is kernels/quant_gemm.py's `launch`. The reference
dequantizes with kernels/gguf_quant.py and calls F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.gguf_quant import dequantize
from kernels.quant_gemm import check_x, launch, precision

GGUF_KERNEL_TYPES = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2}
_GGUF_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


@triton.jit
def _f16_at(ptr, offs, mask):
    """The float16 stored little-endian at byte offsets `offs`, as float32."""
    lo = tl.load(ptr + offs, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + offs + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _gguf_dequant_tile(w_ptr, rk, rn, K, N, row_bytes, QTYPE: tl.constexpr,
                       BLOCK_BYTES: tl.constexpr):
    mask = (rk < K)[:, None] & (rn < N)[None, :]
    j = rk % 32  # position in the 32-weight block
    base = rn[None, :].to(tl.int64) * row_bytes + ((rk // 32) * BLOCK_BYTES)[:, None]  # (BK, BN)
    d = _f16_at(w_ptr, base, mask)
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
    QTYPE: tl.constexpr, BLOCK_BYTES: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
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
        w = _gguf_dequant_tile(w_ptr, rk, rn, k_end, N, row_bytes, QTYPE, BLOCK_BYTES)
        acc += tl.dot(x, w.to(x.dtype), input_precision=PRECISION)
    out_mask = (rm < M)[:, None] & (rn < N)[None, :]
    offs = pid_s * stride_os + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def gguf_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, qtype: str) -> torch.Tensor:
    return F.linear(x, dequantize(qweight, qtype, x.shape[1]).to(x.dtype))


def gguf_matmul(x: torch.Tensor, qweight: torch.Tensor, qtype: str,
                split_k: int | None = None) -> torch.Tensor:
    """x (M, K) @ W^T with W (N, K) in llama.cpp blocks → (M, N) in x's dtype."""
    if qtype not in GGUF_KERNEL_TYPES:
        raise ValueError(f"no kernel for GGUF type {qtype}; supported: "
                         f"{', '.join(GGUF_KERNEL_TYPES)} (others use gguf_matmul_ref)")
    check_x(x)
    M, K = x.shape
    block_bytes = _GGUF_BLOCK_BYTES[qtype]
    if K % 32 or qweight.dtype != torch.uint8 or qweight.dim() != 2 or \
            qweight.shape[1] != K // 32 * block_bytes:
        raise ValueError(f"{qtype} weight for K={K} must be (N, {K // 32 * block_bytes}) uint8 "
                         f"(K a multiple of 32); got {tuple(qweight.shape)} {qweight.dtype}")
    if qweight.device != x.device or not qweight.is_contiguous():
        raise ValueError(f"qweight must be contiguous and on x's device ({x.device})")
    N = qweight.shape[0]
    return launch(x, N, K, split_k, lambda out, grid, k_split, blocks: _gguf_gemm_kernel[grid](
        x, qweight, out, M, N, K, k_split, qweight.stride(0), x.stride(0),
        out.stride(0), out.stride(1),
        QTYPE=GGUF_KERNEL_TYPES[qtype], BLOCK_BYTES=block_bytes, PRECISION=precision(x),
        **blocks,
    ))  # fmt: skip
