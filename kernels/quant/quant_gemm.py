"""Dequantize-and-multiply for quantized linears: out (M, N) = x (M, K) @ W^T.

Int weights (AWQ / GPTQ / compressed-tensors) in the int layout
(engine/quantization/int_layout.py): qweight (K // pack, N) int32, 4 or 8 bits packed along K;
zeros (G, N) uint8; scales (G, N); g_idx (K,) (read only for act-order; otherwise group =
k // group_size). `int_quant_matmul` picks by M:

    M <= GEMV_MAX_M (16)        kernels/quant/int_gemv.py: the decode GEMV
    M > 16, 16-bit x            by M bucket (kernels/quant/int_mma.py's `GEMM_BLOCKS`, measured):
                                `int_mma`, W never materialised, or `int_dequant_matmul`, W
                                written once into a scratch buffer, then cuBLAS
    fp32 x                      `_int_gemm_kernel` here: per-element dequant, fp32 math

The reference of every kernel here and in kernels/quant/gguf_gemm.py is `dequantized_matmul_ref`:
x @ W^T in x's dtype, with W dequantized by its format's torch code
(hearth.engine.quantization; kernels import no engine code, so tests compose the two).
GGUF blocks: kernels/quant/gguf_gemm.py (same launcher, `launch`).

Measured per-M times and what bounds each path: docs/benchmarks.md (int4 at M > 16).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from hearth.kernels.quant import int_mma as mma
from hearth.kernels.quant.int_gemv import int_gemv, supports

_ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GEMV_MAX_M = 16  # int_quant_matmul sends up to this many rows to int_gemv (0: never; benchmarks)
LEGACY_GEMM = False  # benchmarks: everything the GEMV does not take goes to _int_gemm_kernel


# --------------------------------------------------------------------------------- int (AWQ/GPTQ)
@triton.jit
def _int_dequant_tile(qw_ptr, z_ptr, s_ptr, g_ptr, rk, rn, K, N, stride_qk, stride_zg, stride_sg,
                      BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, OFFSET: tl.constexpr):
    PACK: tl.constexpr = 32 // BITS
    mask = (rk < K)[:, None] & (rn < N)[None, :]
    words = tl.load(qw_ptr + (rk // PACK)[:, None] * stride_qk + rn[None, :], mask=mask, other=0)
    q = (words >> ((rk % PACK) * BITS)[:, None]) & ((1 << BITS) - 1)  # (BLOCK_K, BLOCK_N)
    if GROUP_SIZE > 0:
        g = rk // GROUP_SIZE
    else:  # act-order: any group per input channel
        g = tl.load(g_ptr + rk, mask=rk < K, other=0)
    z = tl.load(z_ptr + g[:, None] * stride_zg + rn[None, :], mask=mask, other=0)
    s = tl.load(s_ptr + g[:, None] * stride_sg + rn[None, :], mask=mask, other=0.0)
    if OFFSET:  # z holds float offsets: w = q s + z
        return q.to(tl.float32) * s.to(tl.float32) + z.to(tl.float32)
    return (q - z.to(tl.int32)).to(tl.float32) * s.to(tl.float32)


@triton.jit
def _int_gemm_kernel(
    x_ptr, qw_ptr, z_ptr, s_ptr, g_ptr, out_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_qk, stride_zg, stride_sg, stride_os, stride_om,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, PRECISION: tl.constexpr, OFFSET: tl.constexpr,
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
        w = _int_dequant_tile(qw_ptr, z_ptr, s_ptr, g_ptr, rk, rn, k_end, N, stride_qk, stride_zg,
                              stride_sg, BITS, GROUP_SIZE, OFFSET)
        acc += tl.dot(x, w.to(x.dtype), input_precision=PRECISION)
    out_mask = (rm < M)[:, None] & (rn < N)[None, :]
    offs = pid_s * stride_os + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def dequantized_matmul_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ W^T → (M, N) in x's dtype, W (N, K) already dequantized (float32)."""
    return F.linear(x, weight.to(x.dtype))


def int_quant_matmul(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor,
                     scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
                     group_size: int | None, split_k: int | None = None, *,
                     counters: torch.Tensor | None = None, offset: bool = False) -> torch.Tensor:
    """x (M, K) @ dequantized W^T (K, N) -> (M, N) in x's dtype.

    With `group_size`, input k belongs to group k // group_size and g_idx is not read (the caller
    checked it is trivial, once, at load); None: groups come from g_idx (act-order).
    The path goes by M (module docstring). `counters`: int32 zeros, at least N of them, that the
    GEMV and int_mma use for split-K and leave zero (a layer passes its own; None allocates).
    `offset`: zeros holds float offsets b and w = q s + b (GGUF Q4_1 / Q4_K repacked)."""
    _check_int_args(x, qweight, zeros, scales, g_idx, bits)
    M, K = x.shape
    N = qweight.shape[1]
    if group_size is not None and K % group_size:
        raise ValueError(f"group_size {group_size} does not divide K={K}; pass None to use g_idx")
    if _gemv_fits(x, bits, group_size):
        return int_gemv(x, qweight, zeros, scales, bits, group_size, split_k=split_k,
                        counters=counters, offset=offset)
    if x.dtype != torch.float32 and not LEGACY_GEMM:
        blocks = mma.gemm_blocks(M)
        if blocks is None:
            return mma.int_dequant_matmul(x, qweight, zeros, scales, g_idx, bits, group_size,
                                          offset)
        if mma.mma_step(blocks, K, group_size) >= 16:
            return mma.int_mma(x, qweight, zeros, scales, g_idx, bits, group_size, blocks=blocks,
                               split_k=split_k, counters=counters, offset=offset)
    return launch(x, N, K, split_k, lambda out, grid, k_split, blocks: _int_gemm_kernel[grid](
        x, qweight, zeros, scales, g_idx, out, M, N, K, k_split,
        x.stride(0), qweight.stride(0), zeros.stride(0), scales.stride(0),
        out.stride(0), out.stride(1),
        BITS=bits, GROUP_SIZE=group_size or 0, PRECISION=precision(x), OFFSET=offset, **blocks,
    ))


def _gemv_fits(x: torch.Tensor, bits: int, group_size: int | None) -> bool:
    """Not act-order, and what int_gemv.supports."""
    if x.shape[0] > GEMV_MAX_M or group_size is None:
        return False
    return supports(x, bits, group_size)


def _check_int_args(x, qweight, zeros, scales, g_idx, bits: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    check_x(x)
    M, K = x.shape
    pack = 32 // bits
    if qweight.dtype != torch.int32 or qweight.dim() != 2 or qweight.shape[0] * pack != K:
        raise ValueError(f"qweight must be ({K // pack}, N) int32 for K={K}, {bits} bits; got "
                         f"{tuple(qweight.shape)} {qweight.dtype}")
    N = qweight.shape[1]
    if zeros.shape != scales.shape or zeros.dim() != 2 or zeros.shape[1] != N:
        raise ValueError(f"zeros and scales must both be (G, {N}); got {tuple(zeros.shape)}, "
                         f"{tuple(scales.shape)}")
    if g_idx.shape != (K,) or g_idx.dtype != torch.int32:
        raise ValueError(f"g_idx must be ({K},) int32, got {tuple(g_idx.shape)} {g_idx.dtype}")
    for name, t in (("qweight", qweight), ("zeros", zeros), ("scales", scales), ("g_idx", g_idx)):
        if t.device != x.device or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous and on x's device ({x.device})")


# ------------------------------------------------------------------------------------- launching
def check_x(x: torch.Tensor) -> None:
    if x.dim() != 2 or x.dtype not in _ACT_DTYPES or x.stride(1) != 1:
        raise ValueError(f"x must be 2-D (M, K), contiguous rows, in {_ACT_DTYPES}; got "
                         f"{tuple(x.shape)} {x.dtype}")


def precision(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs


def _blocks(M: int) -> dict[str, int]:
    if M <= 16:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4}
    if M <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8}


def _default_split(M: int, N: int, K: int, blocks: dict[str, int], device) -> int:
    """Decode: enough K splits that the grid covers every SM about twice."""
    if M > 16 or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = triton.cdiv(M, blocks["BLOCK_M"]) * triton.cdiv(N, blocks["BLOCK_N"])
    max_split = max(1, K // (blocks["BLOCK_K"] * 2))
    return max(1, min(max_split, triton.cdiv(2 * sms, tiles)))


def launch(x: torch.Tensor, N: int, K: int, split_k: int | None, run) -> torch.Tensor:
    M = x.shape[0]
    blocks = _blocks(M)
    if split_k is None:
        split_k = _default_split(M, N, K, blocks, x.device)
    if not isinstance(split_k, int) or split_k < 1:
        raise ValueError(f"split_k must be a positive integer, got {split_k!r}")
    k_split = triton.cdiv(triton.cdiv(K, split_k), blocks["BLOCK_K"]) * blocks["BLOCK_K"]
    split_k = triton.cdiv(K, k_split)
    if M == 0:
        return x.new_empty((0, N))
    grid = (triton.cdiv(M, blocks["BLOCK_M"]), triton.cdiv(N, blocks["BLOCK_N"]), split_k)
    if split_k == 1:
        out = torch.empty((1, M, N), device=x.device, dtype=x.dtype)
        run(out, grid, k_split, blocks)
        return out[0]
    partial = torch.empty((split_k, M, N), device=x.device, dtype=torch.float32)
    run(partial, grid, k_split, blocks)
    return partial.sum(0).to(x.dtype)
