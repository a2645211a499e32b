"""Decode GEMV / skinny GEMM (M <= 16) over int4 / int8 weights in the int layout
(engine/quantization/int_layout.py): qweight (K // pack, N) int32 packed along K, zeros (G, N)
uint8, scales (G, N); input k is in group k // group_size.

Decode is bound by reading the weights, so every byte is loaded once and the arithmetic per weight
is kept to about three instructions:

- Each program loads a (CHUNK // pack, BLOCK_N) tile of whole int32 words (16-byte loads along N)
  and the CHUNK inputs lie inside one group, so zeros and scales are one (BLOCK_N,) load each.
- Two 4-bit values of a word are rotated (one shf) into the mantissa of 1.0 and or-ed with its
  exponent (one lop3 each), no int-to-float conversion:
      f = 1 + q / 256 (bits 15..18)  or  f = 1 + q / 16 (bits 19..22)
  then one fp32 FMA with x[k]. Per chunk, with X the matching sums of x:
      sum_k x[k] (q[k] - z) s = s (256 (D_lo - X_lo) + 16 (D_hi - X_hi) - z X)
- M = 1: fp32 multiply + tl.sum, no tl.dot. M > 1 runs at BLOCK_M = 16 with the same broadcast
  sum, which Triton lowers to tf32 mmas: exact for 16-bit x (f has <= 8 fraction bits), so fp32
  x at M > 1 stays on the dequant-GEMM (`supports`).
- Split-K fills every SM (the grid is (N tiles, splits)). Each split writes fp32 partial sums;
  the program that finishes last for its N tile (an atomic counter per tile) adds the partials in
  a fixed order and writes the output, then puts the counter back to 0: one launch, deterministic.

    K:  |-- split 0 --|-- split 1 --| ... |-- split S-1 --|      partial (S, M, N) fp32
         chunk chunk ...                                      last arrival: out = sum over S

Act-order (g_idx) weights and group sizes that are no multiple of 32 // bits stay on
kernels/quant/quant_gemm.py. At M > 1, steps of fewer than 8 word rows (small groups: GGUF group 32,
Q6_K group 16) are padded with zero rows to 8: Triton 3.6 computed the tf32 row sums wrongly
with 4 rows on an H200.

The versions tried and their timings: docs/benchmarks.md, "Kernel design notes".
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"  # no inline asm there


@dataclass(frozen=True)
class GemvBlocks:
    block_n: int  # output columns per program (128 x num_warps keeps a tile's rows in one thread)
    block_k: int  # splits are multiples of it; loop step gcd(block_k, group_size) (powers of 2)
    num_warps: int
    waves: int  # programs per SM that split-K aims for


def default_blocks(m: int) -> GemvBlocks:
    if m == 1:
        return GemvBlocks(512, 64, 4, 4)
    return GemvBlocks(256, 64, 2, 2)  # M > 1 runs at BLOCK_M = 16


def supports(x: torch.Tensor, bits: int, group_size: int) -> bool:
    """Whether int_quant_matmul sends this x (M <= 16 rows) and group size to int_gemv. At M > 1
    the row sums run as tf32 mmas on CUDA: exact only for 16-bit x. Steps shorter than 8 word
    rows are padded (see int_gemv): that pays for 8-bit small groups (GGUF Q6_K, group 16) but
    not for 4-bit group 32, which int_mma runs faster (docs/benchmarks.md)."""
    M = x.shape[0]
    if M > 16 or group_size % (32 // bits):
        return False
    if M == 1 or not x.is_cuda:
        return True
    rows = math.gcd(default_blocks(M).block_k, group_size) // (32 // bits)
    return x.dtype != torch.float32 and (rows >= 8 or bits == 8)


@triton.jit
def _pair(words, i: tl.constexpr, ASM: tl.constexpr):
    """Values 2i+1 and (2i+2) % 8 of every 4-bit word as 1 + q / 256 and 1 + q / 16: one rotate
    puts them at bits 15..18 and 19..22, one and-or each makes the float (a single lop3 in asm)."""
    rot: tl.constexpr = (11 - 8 * i) % 32  # value 2i+1 sits at bit 8i+4; 8i+4+rot = 15 (mod 32)
    if ASM:
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b32 t; shf.l.wrap.b32 t, $2, $2, $3;"
            " lop3.b32 $0, t, 0x00078000, 0x3F800000, 0xEA;"
            " lop3.b32 $1, t, 0x00780000, 0x3F800000, 0xEA; }",
            "=r,=r,r,r", [words, tl.full(words.shape, rot, tl.int32)],
            dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
    else:  # the same bits in plain Triton (the interpreter has no asm)
        u = words.to(tl.uint32, bitcast=True)
        t = ((u << rot) | (u >> (32 - rot))).to(tl.int32, bitcast=True)
        lo = (t & 0x00078000) | 0x3F800000
        hi = (t & 0x00780000) | 0x3F800000
    return lo.to(tl.float32, bitcast=True), hi.to(tl.float32, bitcast=True)


@triton.jit
def _byte(words, j: tl.constexpr):
    """Value j of every 8-bit word as 1 + q / 256 (bits 15..22)."""
    shift: tl.constexpr = 15 - 8 * j
    if shift >= 0:
        t = words << shift
    else:
        t = words >> -shift
    return ((t & 0x007F8000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _load_x(x_ptr, rm, k, M, stride_xm, row_ok, BLOCK_M: tl.constexpr):
    """x[:, k] as fp32: (ROWS,) at M = 1, else (BLOCK_M, ROWS); zero where row_ok is False (the
    padding rows of a short chunk)."""
    if BLOCK_M == 1:
        x = tl.load(x_ptr + k)
    else:
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :],
                    mask=(rm < M)[:, None] & row_ok[None, :], other=0.0)
    return x.to(tl.float32)


@triton.jit
def _load_weights(qw_ptr, z_ptr, s_ptr, kk, k_end, rn, N, stride_qk, stride_zg, stride_sg,
                  BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, CHUNK: tl.constexpr,
                  ROWS_PAD: tl.constexpr):
    """Words (ROWS_PAD, BLOCK_N), zeros and scales (BLOCK_N,) of inputs [kk, kk + CHUNK), rows
    past CHUNK // pack zero; nothing is read past the split (chunks lie wholly inside or outside
    it)."""
    PACK: tl.constexpr = 32 // BITS
    r = tl.arange(0, ROWS_PAD)
    mask = (rn < N) & (kk < k_end)
    w_mask = mask[None, :]
    if ROWS_PAD > CHUNK // PACK:
        w_mask = w_mask & (r < CHUNK // PACK)[:, None]
    words = tl.load(qw_ptr + (kk // PACK + r)[:, None] * stride_qk + rn[None, :], mask=w_mask,
                    other=0)
    g = kk // GROUP_SIZE
    s = tl.load(s_ptr + g * stride_sg + rn, mask=mask, other=0.0)
    z = tl.load(z_ptr + g * stride_zg + rn, mask=mask, other=0)
    return words, s, z


@triton.jit
def _dot(x, f, BLOCK_M: tl.constexpr):
    """x (ROWS,) or (BLOCK_M, ROWS) times f (ROWS, BLOCK_N), summed over the rows. At BLOCK_M = 16
    Triton makes the broadcast-sum a tf32 mma: exact for 16-bit x (f has <= 8 fraction bits)."""
    if BLOCK_M == 1:
        d = tl.sum(x[:, None] * f, axis=0)
    else:
        d = tl.sum(x[:, :, None] * f[None, :, :], axis=1)
    return d


@triton.jit
def _chunk(x_ptr, words, s, z, kk, rm, M, stride_xm, BITS: tl.constexpr, CHUNK: tl.constexpr,
           ASM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
           OFFSET: tl.constexpr, ROWS_PAD: tl.constexpr):
    """(BLOCK_M, BLOCK_N) contribution of inputs [kk, kk + CHUNK), all in one group.

    Values decoded as 1 + q / 256 go to d_lo, those decoded as 1 + q / 16 to d_hi (4 bits only);
    x_lo, x_hi sum the matching inputs, so sum x q = 256 (d_lo - X_lo) + 16 (d_hi - X_hi)."""
    PACK: tl.constexpr = 32 // BITS
    ROWS: tl.constexpr = ROWS_PAD  # word rows in the tile; those past CHUNK // PACK are padding
    r = tl.arange(0, ROWS)
    k = kk + r * PACK  # the input of value 0 of each word row
    row_ok = r < CHUNK // PACK
    if BLOCK_M == 1:
        d_lo = tl.zeros((BLOCK_N,), dtype=tl.float32)
        x_lo = tl.zeros((ROWS,), dtype=tl.float32)
    else:
        d_lo = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        x_lo = tl.zeros((BLOCK_M, ROWS), dtype=tl.float32)
    d_hi, x_hi = d_lo, x_lo
    if BITS == 4:
        for i in tl.static_range(4):
            lo, hi = _pair(words, i, ASM)
            xj = _load_x(x_ptr, rm, k + 2 * i + 1, M, stride_xm, row_ok, BLOCK_M)
            d_lo += _dot(xj, lo, BLOCK_M)
            x_lo += xj
            xj = _load_x(x_ptr, rm, k + (2 * i + 2) % 8, M, stride_xm, row_ok, BLOCK_M)
            d_hi += _dot(xj, hi, BLOCK_M)
            x_hi += xj
    else:
        for j in tl.static_range(4):
            xj = _load_x(x_ptr, rm, k + j, M, stride_xm, row_ok, BLOCK_M)
            d_lo += _dot(xj, _byte(words, j), BLOCK_M)
            x_lo += xj
    s = s.to(tl.float32)
    z = z.to(tl.float32)
    if BLOCK_M == 1:
        sx_lo, sx_hi = tl.sum(x_lo, axis=0), tl.sum(x_hi, axis=0)
    else:
        sx_lo, sx_hi = tl.sum(x_lo, axis=1)[:, None], tl.sum(x_hi, axis=1)[:, None]
        s, z = s[None, :], z[None, :]
    qdot = d_lo * 256 + d_hi * 16 - (sx_lo * 256 + sx_hi * 16)  # sum_k x[k] q[k]
    if OFFSET:  # w = q s + b, b in z
        out = s * qdot + z * (sx_lo + sx_hi)
    else:
        out = s * (qdot - z * (sx_lo + sx_hi))
    if BLOCK_M == 1:
        out = out[None, :]
    return out


@triton.jit
def _int_gemv_kernel(
    x_ptr, qw_ptr, z_ptr, s_ptr, out_ptr, partial_ptr, count_ptr,
    M, N, K, k_per_split, num_splits,
    stride_xm, stride_qk, stride_zg, stride_sg, stride_om,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, CHUNK: tl.constexpr, ASM: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, OFFSET: tl.constexpr,
    ROWS_PAD: tl.constexpr,
):
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    if BLOCK_M == 1:
        # The next chunk's loads are issued before this chunk's math in the IR, but ptxas moves
        # them after it (to save registers): other warps hide the latency. Pinning them with a
        # barrier was slower (docs/benchmarks.md).
        words, s, z = _load_weights(qw_ptr, z_ptr, s_ptr, k_start, k_end, rn, N, stride_qk,
                                    stride_zg, stride_sg, BITS, GROUP_SIZE, CHUNK, ROWS_PAD)
        for kk in range(k_start, k_end, CHUNK):
            next_words, next_s, next_z = _load_weights(
                qw_ptr, z_ptr, s_ptr, kk + CHUNK, k_end, rn, N, stride_qk, stride_zg, stride_sg,
                BITS, GROUP_SIZE, CHUNK, ROWS_PAD)
            acc += _chunk(x_ptr, words, s, z, kk, rm, M, stride_xm, BITS, CHUNK, ASM, BLOCK_M,
                          BLOCK_N, OFFSET, ROWS_PAD)
            words, s, z = next_words, next_s, next_z
    else:  # the mma path has no registers to spare for a second tile
        for kk in range(k_start, k_end, CHUNK):
            words, s, z = _load_weights(qw_ptr, z_ptr, s_ptr, kk, k_end, rn, N, stride_qk,
                                        stride_zg, stride_sg, BITS, GROUP_SIZE, CHUNK, ROWS_PAD)
            acc += _chunk(x_ptr, words, s, z, kk, rm, M, stride_xm, BITS, CHUNK, ASM, BLOCK_M,
                          BLOCK_N, OFFSET, ROWS_PAD)
    store_tile(acc, out_ptr, partial_ptr, count_ptr + pid_n, rm, rn, M, N, stride_om, pid_s,
               num_splits, SPLIT, BLOCK_M, BLOCK_N)


@triton.jit
def store_tile(acc, out_ptr, partial_ptr, count_ptr, rm, rn, M, N, stride_om, pid_s, num_splits,
               SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Write the fp32 tile acc (rows rm, columns rn) to out, or with SPLIT, its partial sum to
    partial (num_splits, M, N); the split that arrives last at this tile's counter (count_ptr, an
    int32 zero) adds all partials in split order, writes out and puts the counter back to 0."""
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    out_offs = rm[:, None] * stride_om + rn[None, :]
    if not SPLIT:
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        part_offs = rm[:, None] * N + rn[None, :]  # in one (M, N) slice of partial
        tl.store(partial_ptr + pid_s * M * N + part_offs, acc, mask=mask)
        finish_split(out_ptr, partial_ptr, count_ptr, rm, rn, M, N, stride_om, num_splits,
                     BLOCK_M, BLOCK_N)


@triton.jit
def finish_split(out_ptr, partial_ptr, count_ptr, rm, rn, M, N, stride_om, num_splits,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """After a split wrote its partial sums of the tile (rows rm, columns rn) into partial
    (num_splits, M, N): the split that arrives last at the tile's counter (count_ptr, an int32
    zero) adds all partials in split order, writes out and puts the counter back to 0."""
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    part_offs = rm[:, None] * N + rn[None, :]
    tl.debug_barrier()  # every thread's partial is written before the counter moves
    arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel")
    if arrived == num_splits - 1:  # the last split of this tile adds all partials
        RB: tl.constexpr = 16 // BLOCK_M if BLOCK_M < 8 else 2  # partials per load wave
        total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s0 in range(0, num_splits, RB):
            ss = s0 + tl.arange(0, RB)
            parts = tl.load(partial_ptr + ss[:, None, None] * (M * N) + part_offs[None, :, :],
                            mask=(ss < num_splits)[:, None, None] & mask[None, :, :],
                            other=0.0, cache_modifier=".cg")  # (RB, BLOCK_M, BLOCK_N)
            total += tl.sum(parts, axis=0)  # a fixed order: deterministic
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :],
                 total.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(count_ptr, 0)  # ready for the next launch


def int_gemv(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
             bits: int, group_size: int, *, split_k: int | None = None,
             counters: torch.Tensor | None = None,
             blocks: GemvBlocks | None = None, offset: bool = False) -> torch.Tensor:
    """x (M, K) @ W^T → (M, N) in x's dtype, for M <= 16; arguments as checked by
    quant_gemm.int_quant_matmul (group_size divides K and is a multiple of 32 // bits).

    `counters`: int32 zeros, at least one per N tile (N of them always suffice); the kernel leaves
    them zero. A layer passes its own so that a call needs no memset; None allocates them.
    `offset`: zeros holds float offsets b, w = q s + b (engine/quantization/int_layout.py)."""
    M, K = x.shape
    N = qweight.shape[1]
    if M > 16:
        raise ValueError(f"int_gemv is for M <= 16 rows, got {M}; use int_quant_matmul")
    blocks = blocks or default_blocks(M)
    chunk = math.gcd(blocks.block_k, group_size)
    rows = chunk // (32 // bits)
    # M > 1: a step's row sums are tf32 mmas, which Triton 3.6 got wrong on an H200 with fewer
    # than 8 rows: shorter steps (small groups) are padded to 8 rows of zeros.
    rows_pad = rows if M == 1 else max(rows, 8)
    n_tiles = triton.cdiv(N, blocks.block_n)
    k_split = _k_per_split(K, n_tiles, split_k, blocks, x.device)
    num_splits = triton.cdiv(K, k_split)
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return out
    partial, counters = split_scratch(out, num_splits, n_tiles, counters)
    _int_gemv_kernel[(n_tiles, num_splits)](
        x, qweight, zeros, scales, out, partial, counters if counters is not None else out,
        M, N, K, k_split, num_splits,
        x.stride(0), qweight.stride(0), zeros.stride(0), scales.stride(0), out.stride(0),
        BITS=bits, GROUP_SIZE=group_size, CHUNK=chunk, ASM=x.is_cuda and not _INTERPRETING,
        SPLIT=num_splits > 1, BLOCK_M=1 if M == 1 else 16, BLOCK_N=blocks.block_n,
        OFFSET=offset, ROWS_PAD=rows_pad, num_warps=blocks.num_warps,
    )
    return out


def split_scratch(out: torch.Tensor, num_splits: int, tiles: int,
                  counters: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split-K's fp32 partial sums (num_splits, M, N) and the tiles' arrival counters (the
    caller's, checked, or new zeros); (out, counters) when there is one split."""
    if num_splits == 1:
        return out, counters
    partial = torch.empty((num_splits, *out.shape), device=out.device, dtype=torch.float32)
    if counters is None:
        counters = torch.zeros(tiles, device=out.device, dtype=torch.int32)
    if counters.dtype != torch.int32 or counters.numel() < tiles or counters.device != out.device:
        raise ValueError(f"counters must be >= {tiles} int32 zeros on {out.device}")
    return partial, counters


def _k_per_split(K: int, n_tiles: int, split_k: int | None, blocks: GemvBlocks, device) -> int:
    """Inputs per split, a multiple of block_k; by default enough splits for `waves` programs
    per SM."""
    max_split = triton.cdiv(K, blocks.block_k)
    if split_k is None:
        split_k = 1
        if device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            split_k = min(max_split, triton.cdiv(blocks.waves * sms, n_tiles))
    if not isinstance(split_k, int) or split_k < 1:
        raise ValueError(f"split_k must be a positive integer, got {split_k!r}")
    return triton.cdiv(triton.cdiv(K, split_k), blocks.block_k) * blocks.block_k
