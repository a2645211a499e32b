"""int (AWQ / GPTQ / compressed-tensors) weights at M > 16 rows of 16-bit x, for
kernels/quant/quant_gemm.py's `int_quant_matmul` (the layout is described there):

`int_mma`: each program owns a (BLOCK_M, BLOCK_N) output tile and walks K in steps that lie in
one group, so zeros and scales are one (BLOCK_N,) load per step. The (BLOCK_K // pack, BLOCK_N)
words are loaded once, transposed and interleaved with themselves (the copies of a word stay in
one thread's registers), shifted by constants; q and z are or-ed into the mantissa of a power of
two (no int-to-float conversion), so (q - z) is one exact subtraction, then * s, cast to x's dtype
and tl.dot with fp32 accumulation. The blocks come from a table by M (`GEMM_BLOCKS`); when the
tiles do not fill the SMs, split-K with the GEMV's in-kernel reduction (int_gemv.store_tile).

    words (BK/8, BN) -trans-> (BN, BK/8) -interleave x3-> (BN, BK) >> (k % 8) * 4 & 0xF -> q

`int_dequant_matmul`: one kernel writes W (N, K) in x's dtype into a scratch buffer that every
layer shares, then F.linear (cuBLAS), as the bf16 linears. Measured per M: docs/benchmarks.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from hearth.kernels.quant.int4_frag import frag_tile
from hearth.kernels.quant.int_gemv import store_tile


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
# int_mma wins up to M = 64, the dequantized copy from M = 128 (docs/benchmarks.md).
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
def _dequant_nk(q, z, s, F32: tl.constexpr, dtype: tl.constexpr, OFFSET: tl.constexpr):
    """(q - z) * s in `dtype`; q (BLOCK_N, BLOCK_K) int32, z and s broadcast against it. q and z
    are or-ed into the mantissa of 2^23 (fp32), or of 1024 (fp16) / 128 (bf16, 4 bits only) in
    16 bits: their difference is exact, with no int-to-float conversion. In fp32 the one rounding
    is the final cast, as in the reference; in 16 bits s is rounded to x's dtype first."""
    if OFFSET:  # z holds float offsets: q s + z, in fp32 (the callers force F32)
        f = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # q, exactly
        w = (f * s.to(tl.float32) + z.to(tl.float32)).to(dtype)
    elif F32:
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
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, OFFSET: tl.constexpr,
    FRAG: tl.constexpr = False,
):
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
        if FRAG:  # fragment words (kernels/quant/int4_tc.py): 4 bits, BLOCK_N % 16, BLOCK_K % 64
            q = frag_tile(qw_ptr, pid_n * (BLOCK_N // 16) + tl.arange(0, BLOCK_N // 16),
                          k0 // 64 + tl.arange(0, BLOCK_K // 64), N, K, BLOCK_N // 16,
                          BLOCK_K // 64)
        else:
            words = tl.load(w_ptrs + (k0 // PACK) * stride_qk, mask=n_mask[None, :], other=0)
            q = _unpack_nk(words, BITS, BLOCK_K)
        z, s = _group_params(z_ptr, s_ptr, g_ptr, k0, rk, rn, n_mask, stride_zg, stride_sg,
                             GROUP_SIZE)
        w = _dequant_nk(q, z, s, F32_DEQUANT, x.dtype, OFFSET)
        acc = tl.dot(x, tl.trans(w), acc)  # w (BLOCK_N, BLOCK_K)
    tile = pid_m * tl.num_programs(1) + pid_n
    store_tile(acc, out_ptr, partial_ptr, count_ptr + tile, rm, rn, M, N, stride_om, pid_s,
               num_splits, SPLIT, BLOCK_M, BLOCK_N)


@triton.jit
def _int_dequant_kernel(qw_ptr, z_ptr, s_ptr, g_ptr, w_ptr, N, K, stride_qk, stride_zg,
                        stride_sg, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, OFFSET: tl.constexpr):
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
    w = _dequant_nk(_unpack_nk(words, BITS, BLOCK_K), z, s, True, w_ptr.dtype.element_ty, OFFSET)
    tl.store(w_ptr + rn[:, None].to(tl.int64) * K + (k0 + rk)[None, :], w, mask=n_mask[:, None])



def int_mma(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
            g_idx: torch.Tensor, bits: int, group_size: int | None, *,
            blocks: GemmBlocks | None = None, split_k: int | None = None,
            counters: torch.Tensor | None = None, offset: bool = False,
            frag: bool = False) -> torch.Tensor:
    """x (M, K) @ W^T for 16-bit x, W dequantized tile by tile in registers (arguments as checked
    by int_quant_matmul); `blocks` default to mma_blocks(M). `frag`: qweight holds 4-bit
    fragment words (N // 16, K // 64, 32, 4) (kernels/quant/int4_tc.py); the step must be a multiple
    of 64 (groups of 64 or more)."""
    M, K = x.shape
    N = qweight.shape[0] * 16 if frag else qweight.shape[1]
    blocks = blocks or mma_blocks(M)
    step = mma_step(blocks, K, group_size)
    if x.dtype not in (torch.float16, torch.bfloat16) or step < 16:
        raise ValueError(f"int_mma needs 16-bit x and a K step of >= 16 (gcd of block_k "
                         f"{blocks.block_k}, the group size and K={K}); got {x.dtype}, {step}")
    if frag and (bits != 4 or step % 64 or blocks.block_n % 16):
        raise ValueError(f"int_mma on fragment words needs 4 bits, a K step of 64k and block_n "
                         f"of 16k; got {bits} bits, step {step}, block_n {blocks.block_n}")
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
        x.stride(0), 0 if frag else qweight.stride(0), zeros.stride(0), scales.stride(0),
        out.stride(0),
        BITS=bits, GROUP_SIZE=group_size or 0, SPLIT=num_splits > 1,
        F32_DEQUANT=blocks.f32_dequant or (bits == 8 and x.dtype == torch.bfloat16),
        OFFSET=offset, FRAG=frag,
        BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_K=step,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )
    return out


def int_dequant_matmul(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor,
                       scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
                       group_size: int | None, offset: bool = False) -> torch.Tensor:
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
        OFFSET=offset,
        num_warps=4,
    )
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


def mma_step(blocks: GemmBlocks, K: int, group_size: int | None) -> int:
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
