"""Dequantize-and-multiply for quantized linears: out (M, N) = x (M, K) @ W^T.

Int weights (AWQ / GPTQ / compressed-tensors) in the int layout (kernels/int_pack.py): qweight
(K // pack, N) int32, 4 or 8 bits packed along K; zeros (G, N) uint8; scales (G, N); g_idx (K,)
(read only for act-order; otherwise group = k // group_size). `int_quant_matmul` picks by M:

    M <= GEMV_MAX_M (16)        kernels/int_gemv.py: the decode GEMV
    M > 16, 16-bit x            by M bucket (`GEMM_BLOCKS`, measured), one of
                                `int_mma`: W never materialised (below)
                                `int_dequant_matmul`: W (N, K) written once into a scratch buffer
                                in x's dtype, then F.linear (cuBLAS), as the bf16 linears
    fp32 x                      `_int_gemm_kernel`: per-element dequant, fp32 math

`int_mma`: each program owns a (BLOCK_M, BLOCK_N) output tile and walks K in steps that lie in
one group, so zeros and scales are one (BLOCK_N,) load per step. The (BLOCK_K // pack, BLOCK_N)
words are loaded once, transposed and interleaved with themselves (the copies of a word stay in
one thread's registers), shifted by constants; q and z are or-ed into the mantissa of a power of
two (no int-to-float conversion), so (q - z) is one exact subtraction, then * s, cast to x's dtype
and tl.dot with fp32 accumulation. The blocks come from a table by M (`GEMM_BLOCKS`); when the
tiles do not fill the SMs, split-K with the GEMV's in-kernel reduction (int_gemv.store_tile).

    words (BK/8, BN) -trans-> (BN, BK/8) -interleave x3-> (BN, BK) >> (k % 8) * 4 & 0xF -> q

References (`*_ref`) dequantize the whole weight with kernels/int_pack.py and call F.linear.
GGUF blocks: kernels/gguf_gemm.py (same launcher, `launch`).

Measured per-M times and what bounds each path: docs/benchmarks.md (int4 at M > 16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.int_gemv import int_gemv, store_tile, supports
from kernels.int_pack import dequantize_int_layout

_ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GEMV_MAX_M = 16  # int_quant_matmul sends up to this many rows to int_gemv (0: never; benchmarks)
LEGACY_GEMM = False  # benchmarks: everything the GEMV does not take goes to _int_gemm_kernel


@dataclass(frozen=True)
class GemmBlocks:
    block_m: int
    block_n: int
    block_k: int  # at most: the step is gcd(block_k, group size) so that it lies in one group
    num_warps: int
    num_stages: int
    f32_dequant: bool  # (q - z) * s in fp32 (as the reference), else in x's dtype
    split: bool  # split K when the tiles alone leave SMs idle


# (largest M, int_mma's blocks, or None: int_dequant_matmul), the first that fits; beyond the
# last entry, int_dequant_matmul.
# Measured (module docstring): int_mma wins up to M = 64, the dequantized copy from M = 128.
GEMM_BLOCKS: tuple[tuple[int, GemmBlocks | None], ...] = (
    (64, GemmBlocks(64, 64, 128, 4, 4, True, True)),
)
LARGE_M_BLOCKS = GemmBlocks(128, 128, 64, 8, 3, True, False)  # int_mma where the table says None


def gemm_blocks(m: int) -> GemmBlocks | None:
    """int_quant_matmul's path for m > 16 rows of 16-bit x: int_mma's blocks, or None for
    int_dequant_matmul."""
    for max_m, blocks in GEMM_BLOCKS:
        if m <= max_m:
            return blocks
    return None


def mma_blocks(m: int) -> GemmBlocks:
    """int_mma's default blocks for m rows."""
    return gemm_blocks(m) or LARGE_M_BLOCKS


# --------------------------------------------------------------------------------- int (AWQ/GPTQ)
@triton.jit
def _unpack_nk(words, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Words (BLOCK_K // pack, BLOCK_N) -> values (BLOCK_N, BLOCK_K) int32. Transposed first, so
    the copies that interleaving makes of a word sit next to it in the same thread's registers
    (no data moves) and each register's shift is a constant."""
    w = tl.trans(words)  # (BLOCK_N, BLOCK_K // pack)
    w = tl.interleave(w, w)
    w = tl.interleave(w, w)  # each word 4 times: 8 bits
    if BITS == 4:
        w = tl.interleave(w, w)  # 8 times
    PACK: tl.constexpr = 32 // BITS
    shift = (tl.arange(0, BLOCK_K) % PACK) * BITS  # value k % pack of word k // pack
    return (w >> shift[None, :]) & ((1 << BITS) - 1)


@triton.jit
def _dequant_nk(q, z, s, F32: tl.constexpr, dtype: tl.constexpr):
    """(q - z) * s in `dtype`; q (BLOCK_N, BLOCK_K) int32, z and s broadcast against it. q and z
    are or-ed into the mantissa of 2^23 (fp32), or of 1024 (fp16) / 128 (bf16, 4 bits only) in
    16 bits: their difference is exact, with no int-to-float conversion. In fp32 the one rounding
    is the final cast, as in the reference; in 16 bits s is rounded to x's dtype first."""
    if F32:
        f = (q | 0x4B000000).to(tl.float32, bitcast=True)
        fz = (z.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True)
        w = ((f - fz) * s.to(tl.float32)).to(dtype)
    else:
        if dtype == tl.float16:
            MAGIC: tl.constexpr = 0x6400
        else:
            MAGIC: tl.constexpr = 0x4300
        f = (q | MAGIC).to(tl.int16).to(dtype, bitcast=True)
        fz = (z.to(tl.int32) | MAGIC).to(tl.int16).to(dtype, bitcast=True)
        w = (f - fz) * s.to(dtype)
    return w


@triton.jit
def _group_params(z_ptr, s_ptr, g_ptr, k0, rk, rn, n_mask, stride_zg, stride_sg,
                  GROUP_SIZE: tl.constexpr):
    """Zeros and scales of inputs k0 + rk, columns rn: (BLOCK_N, 1) when the step lies in one
    group (GROUP_SIZE a multiple of the step), else gathered (BLOCK_N, BLOCK_K) through g_idx
    (GROUP_SIZE 0: act-order)."""
    if GROUP_SIZE > 0:
        g = k0 // GROUP_SIZE
        z = tl.load(z_ptr + g * stride_zg + rn, mask=n_mask, other=0)[:, None]
        s = tl.load(s_ptr + g * stride_sg + rn, mask=n_mask, other=0.0)[:, None]
    else:
        g = tl.load(g_ptr + k0 + rk)[None, :]
        z = tl.load(z_ptr + g * stride_zg + rn[:, None], mask=n_mask[:, None], other=0)
        s = tl.load(s_ptr + g * stride_sg + rn[:, None], mask=n_mask[:, None], other=0.0)
    return z, s


@triton.jit
def _int_mma_kernel(
    x_ptr, qw_ptr, z_ptr, s_ptr, g_ptr, out_ptr, partial_ptr, count_ptr,
    M, N, K, k_per_split, num_splits,
    stride_xm, stride_qk, stride_zg, stride_sg, stride_om,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, F32_DEQUANT: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    PACK: tl.constexpr = 32 // BITS
    pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :]  # (BLOCK_M, BLOCK_K)
    w_ptrs = qw_ptr + tl.arange(0, BLOCK_K // PACK)[:, None] * stride_qk + rn[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):  # K and the split are multiples of BLOCK_K
        x = tl.load(x_ptrs + k0, mask=(rm < M)[:, None], other=0.0)
        words = tl.load(w_ptrs + (k0 // PACK) * stride_qk, mask=n_mask[None, :], other=0)
        z, s = _group_params(z_ptr, s_ptr, g_ptr, k0, rk, rn, n_mask, stride_zg, stride_sg,
                             GROUP_SIZE)
        w = _dequant_nk(_unpack_nk(words, BITS, BLOCK_K), z, s, F32_DEQUANT, x.dtype)
        acc = tl.dot(x, tl.trans(w), acc)  # w (BLOCK_N, BLOCK_K)
    tile = pid_m * tl.num_programs(1) + pid_n
    store_tile(acc, out_ptr, partial_ptr, count_ptr + tile, rm, rn, M, N, stride_om, pid_s,
               num_splits, SPLIT, BLOCK_M, BLOCK_N)


@triton.jit
def _int_dequant_kernel(qw_ptr, z_ptr, s_ptr, g_ptr, w_ptr, N, K, stride_qk, stride_zg,
                        stride_sg, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W (N, K) in w's dtype, one (BLOCK_N, BLOCK_K) tile per program: words read once, each
    thread stores runs of 8 consecutive k (16 bytes)."""
    PACK: tl.constexpr = 32 // BITS
    k0 = tl.program_id(0) * BLOCK_K
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    rows = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
    words = tl.load(qw_ptr + rows[:, None] * stride_qk + rn[None, :], mask=n_mask[None, :],
                    other=0)
    z, s = _group_params(z_ptr, s_ptr, g_ptr, k0, rk, rn, n_mask, stride_zg, stride_sg,
                         GROUP_SIZE)
    w = _dequant_nk(_unpack_nk(words, BITS, BLOCK_K), z, s, True, w_ptr.dtype.element_ty)
    tl.store(w_ptr + rn[:, None].to(tl.int64) * K + (k0 + rk)[None, :], w, mask=n_mask[:, None])


@triton.jit
def _int_dequant_tile(qw_ptr, z_ptr, s_ptr, g_ptr, rk, rn, K, N, stride_qk, stride_zg, stride_sg,
                      BITS: tl.constexpr, GROUP_SIZE: tl.constexpr):
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
    return (q - z.to(tl.int32)).to(tl.float32) * s.to(tl.float32)


@triton.jit
def _int_gemm_kernel(
    x_ptr, qw_ptr, z_ptr, s_ptr, g_ptr, out_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_qk, stride_zg, stride_sg, stride_os, stride_om,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, PRECISION: tl.constexpr,
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
        w = _int_dequant_tile(qw_ptr, z_ptr, s_ptr, g_ptr, rk, rn, k_end, N, stride_qk, stride_zg,
                              stride_sg, BITS, GROUP_SIZE)
        acc += tl.dot(x, w.to(x.dtype), input_precision=PRECISION)
    out_mask = (rm < M)[:, None] & (rn < N)[None, :]
    offs = pid_s * stride_os + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def int_quant_matmul_ref(x, qweight, zeros, scales, g_idx, bits: int) -> torch.Tensor:
    w_t = dequantize_int_layout(qweight, zeros, scales, g_idx, bits)  # (K, N)
    return F.linear(x, w_t.t().to(x.dtype))


def int_quant_matmul(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor,
                     scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
                     group_size: int | None, split_k: int | None = None, *,
                     counters: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ dequantized W^T (K, N) -> (M, N) in x's dtype.

    With `group_size`, input k belongs to group k // group_size and g_idx is not read (the caller
    checked it is trivial, once, at load); None: groups come from g_idx (act-order).
    The path goes by M (module docstring). `counters`: int32 zeros, at least N of them, that the
    GEMV and int_mma use for split-K and leave zero (a layer passes its own; None allocates)."""
    _check_int_args(x, qweight, zeros, scales, g_idx, bits)
    M, K = x.shape
    N = qweight.shape[1]
    if group_size is not None and K % group_size:
        raise ValueError(f"group_size {group_size} does not divide K={K}; pass None to use g_idx")
    if _gemv_fits(x, bits, group_size):
        return int_gemv(x, qweight, zeros, scales, bits, group_size, split_k=split_k,
                        counters=counters)
    if x.dtype != torch.float32 and not LEGACY_GEMM:
        blocks = gemm_blocks(M)
        if blocks is None:
            return int_dequant_matmul(x, qweight, zeros, scales, g_idx, bits, group_size)
        if _mma_step(blocks, K, group_size) >= 16:
            return int_mma(x, qweight, zeros, scales, g_idx, bits, group_size, blocks=blocks,
                           split_k=split_k, counters=counters)
    return launch(x, N, K, split_k, lambda out, grid, k_split, blocks: _int_gemm_kernel[grid](
        x, qweight, zeros, scales, g_idx, out, M, N, K, k_split,
        x.stride(0), qweight.stride(0), zeros.stride(0), scales.stride(0),
        out.stride(0), out.stride(1),
        BITS=bits, GROUP_SIZE=group_size or 0, PRECISION=precision(x), **blocks,
    ))  # fmt: skip


def int_mma(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
            g_idx: torch.Tensor, bits: int, group_size: int | None, *,
            blocks: GemmBlocks | None = None, split_k: int | None = None,
            counters: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ W^T for 16-bit x, W dequantized tile by tile in registers (arguments as checked
    by int_quant_matmul); `blocks` default to mma_blocks(M)."""
    M, K = x.shape
    N = qweight.shape[1]
    blocks = blocks or mma_blocks(M)
    step = _mma_step(blocks, K, group_size)
    if x.dtype not in (torch.float16, torch.bfloat16) or step < 16:
        raise ValueError(f"int_mma needs 16-bit x and a K step of >= 16 (gcd of block_k "
                         f"{blocks.block_k}, the group size and K={K}); got {x.dtype}, {step}")
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return out
    tiles = triton.cdiv(M, blocks.block_m) * triton.cdiv(N, blocks.block_n)
    k_split = _mma_k_split(K, step, tiles, blocks, split_k, x.device)
    num_splits = triton.cdiv(K, k_split)
    partial = out
    if num_splits > 1:
        partial = torch.empty((num_splits, M, N), device=x.device, dtype=torch.float32)
        counters = _split_counters(counters, tiles, x.device)
    _int_mma_kernel[(triton.cdiv(M, blocks.block_m), triton.cdiv(N, blocks.block_n), num_splits)](
        x, qweight, zeros, scales, g_idx, out, partial, out if counters is None else counters,
        M, N, K, k_split, num_splits,
        x.stride(0), qweight.stride(0), zeros.stride(0), scales.stride(0), out.stride(0),
        BITS=bits, GROUP_SIZE=group_size or 0, SPLIT=num_splits > 1,
        F32_DEQUANT=blocks.f32_dequant or (bits == 8 and x.dtype == torch.bfloat16),
        BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_K=step,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )  # fmt: skip
    return out


def int_dequant_matmul(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor,
                       scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
                       group_size: int | None) -> torch.Tensor:
    """x (M, K) @ W^T through W (N, K) in x's dtype: one kernel writes it into the scratch buffer
    that every layer shares (`dequant_scratch`), then F.linear, the bf16 linears' cuBLAS GEMM.
    Costs writing and reading W once more than a bf16 linear; pays off where M amortises it."""
    M, K = x.shape
    N = qweight.shape[1]
    w = dequant_scratch(N * K, x.device, x.dtype).view(N, K)
    step = math.gcd(128, group_size or K)
    _int_dequant_kernel[(K // step, triton.cdiv(N, 64))](
        qweight, zeros, scales, g_idx, w, N, K, qweight.stride(0), zeros.stride(0),
        scales.stride(0), BITS=bits, GROUP_SIZE=group_size or 0, BLOCK_N=64, BLOCK_K=step,
        num_warps=4,
    )  # fmt: skip
    return F.linear(x, w)


class _Scratch:
    """One buffer per (device, dtype) for int_dequant_matmul, sized to the largest weight reserved
    or seen. Allocated outside capture (the profiling pass or a graph's warm-up run reaches every
    layer first), so CUDA graphs capture its address; a buffer outgrown later is kept, never
    freed, because a captured graph may still write it."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.retired: list[torch.Tensor] = []
        self.reserved = 0

    def get(self, numel: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            if buf is not None:
                self.retired.append(buf)
            buf = torch.empty(max(numel, self.reserved), device=device, dtype=dtype)
            self.buffers[key] = buf
        return buf[:numel]


_SCRATCH = _Scratch()


def reserve_dequant_scratch(numel: int) -> None:
    """Size the (not yet allocated) scratch for a weight of `numel` values: layers call this at
    load, so the first int_dequant_matmul allocates it once at its final size."""
    _SCRATCH.reserved = max(_SCRATCH.reserved, numel)


def dequant_scratch(numel: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return _SCRATCH.get(numel, device, dtype)


def _mma_step(blocks: GemmBlocks, K: int, group_size: int | None) -> int:
    """int_mma's K step: inside one group, and K a multiple of it."""
    return math.gcd(blocks.block_k, group_size or K, K)


def _mma_k_split(K: int, step: int, tiles: int, blocks: GemmBlocks, split_k: int | None,
                 device) -> int:
    """Inputs per split, a multiple of step; by default (blocks.split, CUDA) as many splits as
    fit beside the tiles in one wave of programs, each at least 4 steps long."""
    if split_k is None:
        split_k = 1
        if blocks.split and device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            split_k = max(1, min(sms // tiles, K // (4 * step)))
    if not isinstance(split_k, int) or split_k < 1:
        raise ValueError(f"split_k must be a positive integer, got {split_k!r}")
    return triton.cdiv(triton.cdiv(K, split_k), step) * step


def _split_counters(counters: torch.Tensor | None, tiles: int, device) -> torch.Tensor:
    if counters is None:
        return torch.zeros(tiles, device=device, dtype=torch.int32)
    if counters.dtype != torch.int32 or counters.numel() < tiles or counters.device != device:
        raise ValueError(f"counters must be >= {tiles} int32 zeros on {device}")
    return counters


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
