"""Decode GEMV on the tensor cores for 4-bit weights (M <= 16): out = x @ W^T, W int4 with group
scales and zero points (or offsets), the weights re-packed once at load into mma fragment words
(int4_frag.py draws the layout: which row, k slot and nibble each bit of a lane's word holds).

Why: the fp32 GEMV (int_gemv.py) spends ~3.7 instructions per weight (decode, FMA, x loads).
Here one `mma.sync.m16n8k16` takes 256 weights, so a lane spends about one instruction per
weight: 3 shifts and 4 `lop3` turn its word into the mma's four A registers (value e of a_r sits
at nibble r + 4e, so `lop3(word >> 4r, 0x000F000F, MAGIC)` is a_r as two 16-bit floats MAGIC + q:
bf16 128 + q, fp16 1024 + q, exact), and the tensor core does the multiply-adds (fp32
accumulate). Which input k sits in which slot is free (A and B are
permuted alike); it is chosen so that one 16-byte load gives a lane its x (B registers) for two
tiles, and one more its words of four tiles. No shared memory, no shuffles: the words a lane
loads are its operands.

Per group (32 inputs or a multiple of 64; per-channel: K), with x's rows as the mma's 8 columns
(two mmas a word when M > 8), the mmas give G = sum_k (MAGIC + q) x, and an mma with A = 1 gives
X = sum_k x. Then, in fp32 (linear in G and X, so a split that ends inside a group adds its
part):

    zero points:  out += s (G - (MAGIC + z) X)
    offsets (w = q s + b):  out += s (G - MAGIC X) + b X

Words, x and the group's parameters are loaded a chunk (KC tiles) ahead in registers. Split-K
as in int_gemv: partial sums per split, the last split to arrive adds them in order. On Hopper
the kernel launches with PDL (kernels/pdl.py): its first chunk of words and group parameters
load while the kernel before it finishes; x only after `pdl.wait`. Above 16 rows: frag_matmul.
Timings: docs/benchmarks.md.

The mma is inline PTX issued by `tl.inline_asm_elementwise` once per tensor element. Every tensor
it touches is 1-D with one element per thread (lane = element % 32): Triton's layout for such a
tensor is the same in every version, whereas 2-D layouts differ between Triton 3.6 and 3.7.
The interpreter has no PTX: there `_mma_emulated` computes the same tile products from the same
words with tensor ops, so CPU tests cover the packing, the k permutation, group sums and split-K.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from hearth.kernels import pdl
from hearth.kernels.quant import int_mma
from hearth.kernels.quant.int4_frag import frag_dequantize
from hearth.kernels.quant.int_gemv import finish_split, split_scratch

_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
_MAGIC_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class TcBlocks:
    n_tiles: int  # 16-row tiles per program (spread over the warps)
    num_warps: int
    waves: int  # programs per SM that split-K aims for


def default_blocks(m: int) -> TcBlocks:
    return TcBlocks(4, 4, 4)  # 4 n tiles a program, 4 waves: the best at M = 1..16 (H200)


ENABLED = True  # layers convert eligible weights at load (False: keep the int layout; benchmarks)
TC_MAX_M = 32  # frag_matmul: int4_tc in launches of 16 rows up to here
MMA_MAX_M = 64  # then int_mma on the words (groups of 64k), above: the dequantized copy


def layout_supported(bits: int, group_size: int | None, N: int, K: int, dtype: torch.dtype,
                     device: torch.device | None = None) -> bool:
    """Whether a layer's weights go to fragment words: 4-bit, groups of 32 or 64k inputs (not
    act-order; per-channel: the group is K), N and K in whole tiles, a 16-bit model, and (for a
    CUDA device) compute capability 8.0 or later (`mma.m16n8k16` with bf16 / fp16: Ampere on;
    older GPUs keep the int layout)."""
    if device is not None and device.type == "cuda" and \
            torch.cuda.get_device_capability(device) < (8, 0):
        return False
    return (ENABLED and bits == 4 and group_size is not None and _group_ok(group_size)
            and K % group_size == 0 and N % 16 == 0 and K % 64 == 0 and dtype in _MAGIC_DTYPES)


def _group_ok(group_size: int) -> bool:
    """A loop step (64 or 128 inputs) holds whole groups or lies inside one."""
    return group_size == 32 or group_size % 64 == 0


def _chunk_tiles(K: int, group_size: int) -> int:
    """k tiles a loop step: 8 where K and the group allow, else 4."""
    return 8 if K % 128 == 0 and (group_size % 128 == 0 or group_size in (32, 64)) else 4


@triton.jit
def _mma(w, b0, b1, c0, c1, c2, c3, BF16: tl.constexpr):
    """One m16n8k16 mma per element: A decoded from the fragment word w (MAGIC + q), B the x
    pairs b0, b1, C = c0..c3; returns D."""
    if BF16:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 a0, a1, a2, a3, t;"
            " lop3.b32 a0, $4, 0x000F000F, 0x43004300, 0xEA;"
            " shr.u32 t, $4, 4; lop3.b32 a1, t, 0x000F000F, 0x43004300, 0xEA;"
            " shr.u32 t, $4, 8; lop3.b32 a2, t, 0x000F000F, 0x43004300, 0xEA;"
            " shr.u32 t, $4, 12; lop3.b32 a3, t, 0x000F000F, 0x43004300, 0xEA;"
            " mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
            " {$0, $1, $2, $3}, {a0, a1, a2, a3}, {$5, $6}, {$7, $8, $9, $10}; }",
            "=f,=f,=f,=f,r,r,r,f,f,f,f", [w, b0, b1, c0, c1, c2, c3],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 a0, a1, a2, a3, t;"
            " lop3.b32 a0, $4, 0x000F000F, 0x64006400, 0xEA;"
            " shr.u32 t, $4, 4; lop3.b32 a1, t, 0x000F000F, 0x64006400, 0xEA;"
            " shr.u32 t, $4, 8; lop3.b32 a2, t, 0x000F000F, 0x64006400, 0xEA;"
            " shr.u32 t, $4, 12; lop3.b32 a3, t, 0x000F000F, 0x64006400, 0xEA;"
            " mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"
            " {$0, $1, $2, $3}, {a0, a1, a2, a3}, {$5, $6}, {$7, $8, $9, $10}; }",
            "=f,=f,=f,=f,r,r,r,f,f,f,f", [w, b0, b1, c0, c1, c2, c3],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)


@triton.jit
def _mma_ones(b0, b1, c0, c1, BF16: tl.constexpr):
    """The mma with A = 1: D[row][col] = C + sum_k B[k][col]; returns columns 2t, 2t+1."""
    if BF16:
        d0, d1, _, _ = tl.inline_asm_elementwise(
            "{ .reg .b32 one; mov.b32 one, 0x3F803F80;"
            " mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
            " {$0, $1, $2, $3}, {one, one, one, one}, {$4, $5}, {$6, $7, $6, $7}; }",
            "=f,=f,=f,=f,r,r,f,f", [b0, b1, c0, c1],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)
    else:
        d0, d1, _, _ = tl.inline_asm_elementwise(
            "{ .reg .b32 one; mov.b32 one, 0x3C003C00;"
            " mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"
            " {$0, $1, $2, $3}, {one, one, one, one}, {$4, $5}, {$6, $7, $6, $7}; }",
            "=f,=f,=f,=f,r,r,f,f", [b0, b1, c0, c1],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)
    return d0, d1


@triton.jit
def _mma_emulated(w, xt, c0, c1, c2, c3, MAGIC: tl.constexpr, NT: tl.constexpr):
    """What _mma computes, with tensor ops (the interpreter): w (NT, 32) fragment words, xt
    (16 slots, 8 cols) the B tile; returns D as the four (NT, 32) per-lane registers."""
    p = tl.arange(0, 8)  # nibble p = r + 4e, r = 2 (slot // 8) + row // 8
    vals = ((w[:, :, None] >> (4 * p)[None, None, :]) & 0xF).to(tl.float32) + MAGIC
    v = tl.reshape(vals, (NT, 8, 4, 2, 2, 2))  # nt, g, t, e, slot // 8, row // 8
    a = tl.reshape(tl.permute(v, (0, 5, 1, 4, 2, 3)), (NT, 16, 16))  # A[nt][row][slot]
    d = tl.sum(a[:, :, :, None] * xt[None, None, :, :], axis=2)  # (NT, 16 rows, 8 cols)
    d = tl.reshape(d, (NT, 2, 8, 4, 2))  # nt, row // 8, g, t, col % 2
    d = tl.reshape(tl.permute(d, (0, 2, 3, 1, 4)), (NT, 32, 2, 2))  # nt, lane, row // 8, col % 2
    lo, hi = tl.split(d)  # col 2t, 2t + 1
    d0, d2 = tl.split(lo)
    d1, d3 = tl.split(hi)
    return c0 + d0, c1 + d1, c2 + d2, c3 + d3


@triton.jit
def _x_tile(x_ptr, row0, kt, M, stride_xm):
    """B tile of k tile kt for x rows [row0, row0 + 8): (16 slots, 8 cols) fp32, slot
    2t + e + 8 k8 holding input 32 (kt // 2) + 8t + 4 (kt % 2) + 2 k8 + e (emulation)."""
    slot = tl.arange(0, 16)
    k = 32 * (kt // 2) + 8 * ((slot % 8) // 2) + 4 * (kt % 2) + 2 * (slot // 8) + slot % 2
    col = row0 + tl.arange(0, 8)
    xt = tl.load(x_ptr + col[None, :] * stride_xm + k[:, None], mask=(col < M)[None, :],
                 other=0.0)
    return xt.to(tl.float32)


@triton.jit
def _emulated_step(x_ptr, w, row0, kt, M, stride_xm, q0, q1, q2, q3, xs0, xs1,
                   MAGIC: tl.constexpr, NT: tl.constexpr):
    """The interpreter's _mma and _mma_ones for x rows [row0, row0 + 8) of k tile kt, on the
    (NT * 32,) tensors seen as (NT, 32)."""
    xt = _x_tile(x_ptr, row0, kt, M, stride_xm)
    d0, d1, d2, d3 = _mma_emulated(tl.reshape(w, (NT, 32)), xt, tl.reshape(q0, (NT, 32)),
                                   tl.reshape(q1, (NT, 32)), tl.reshape(q2, (NT, 32)),
                                   tl.reshape(q3, (NT, 32)), MAGIC, NT)
    ones = tl.zeros((NT, 32), dtype=tl.int32)  # q = 0 with MAGIC 1: A = 1
    x0, x1, _, _ = _mma_emulated(ones, xt, tl.reshape(xs0, (NT, 32)), tl.reshape(xs1, (NT, 32)),
                                 tl.reshape(xs0, (NT, 32)), tl.reshape(xs1, (NT, 32)), 1.0, NT)
    B: tl.constexpr = NT * 32
    return (tl.reshape(d0, (B,)), tl.reshape(d1, (B,)), tl.reshape(d2, (B,)),
            tl.reshape(d3, (B,)), tl.reshape(x0, (B,)), tl.reshape(x1, (B,)))


@triton.jit
def _split4(v, B: tl.constexpr):
    """(B, 4), the 4 values of a row in one thread → the four (B,) columns."""
    lo, hi = tl.split(tl.reshape(v, (B, 2, 2)))  # column % 2 = 0 / 1
    v0, v2 = tl.split(lo)
    v1, v3 = tl.split(hi)
    return v0, v1, v2, v3


@triton.jit
def _load_words(wp, ok, KC: tl.constexpr, B: tl.constexpr):
    """Fragment words of KC (4 or 8) consecutive k tiles: 16-byte loads from wp (the first
    quad's words, (B * 4,) pointers), zero where not ok; 8 (B,) tensors (the last 4 unused when
    KC = 4)."""
    w0, w1, w2, w3 = _split4(tl.load(wp, mask=ok, other=0), B)
    w4, w5, w6, w7 = w0, w1, w2, w3
    if KC == 8:
        w4, w5, w6, w7 = _split4(tl.load(wp + 128, mask=ok, other=0), B)
    return w0, w1, w2, w3, w4, w5, w6, w7


@triton.jit
def _load_x(xp, ok, KC: tl.constexpr, B: tl.constexpr):
    """x pairs of KC k tiles for each element's lane: 16-byte loads from xp ((B, 4) pointers,
    the first 32-input block), zero where not ok; 16 (B,) tensors, b0 and b1 of each tile."""
    a0, b0, a1, b1 = _split4(tl.load(xp, mask=ok, other=0), B)
    a2, b2, a3, b3 = _split4(tl.load(xp + 16, mask=ok, other=0), B)
    a4, b4, a5, b5 = a0, b0, a1, b1
    a6, b6, a7, b7 = a2, b2, a3, b3
    if KC == 8:
        a4, b4, a5, b5 = _split4(tl.load(xp + 32, mask=ok, other=0), B)
        a6, b6, a7, b7 = _split4(tl.load(xp + 48, mask=ok, other=0), B)
    return a0, b0, a1, b1, a2, b2, a3, b3, a4, b4, a5, b5, a6, b6, a7, b7


@triton.jit
def _pick(j: tl.constexpr, w0, w1, w2, w3, w4, w5, w6, w7):
    if j == 0:
        return w0
    elif j == 1:
        return w1
    elif j == 2:
        return w2
    elif j == 3:
        return w3
    elif j == 4:
        return w4
    elif j == 5:
        return w5
    elif j == 6:
        return w6
    else:
        return w7


@triton.jit
def _group_params(grp, row, ok, s_ptr, z_ptr, stride_sg, stride_zg):
    """Scales and zeros (or offsets) of group grp for rows row and row + 8, fp32."""
    s_lo = tl.load(s_ptr + grp * stride_sg + row, mask=ok, other=0.0).to(tl.float32)
    s_hi = tl.load(s_ptr + grp * stride_sg + row + 8, mask=ok, other=0.0).to(tl.float32)
    z_lo = tl.load(z_ptr + grp * stride_zg + row, mask=ok, other=0).to(tl.float32)
    z_hi = tl.load(z_ptr + grp * stride_zg + row + 8, mask=ok, other=0).to(tl.float32)
    return s_lo, s_hi, z_lo, z_hi


@triton.jit
def _update(acc0, acc1, acc2, acc3, g0, g1, g2, g3, x0, x1, s_lo, s_hi, z_lo, z_hi,
            MAGIC: tl.constexpr, OFFSET: tl.constexpr):
    """acc += one group: g* the mma sums of (MAGIC + q) x, x0 / x1 the sums of x for the lane's
    columns 2t / 2t+1, s / z of rows g (lo) and g + 8 (hi)."""
    if OFFSET:  # w = q s + b, b in z
        acc0 += s_lo * (g0 - MAGIC * x0) + z_lo * x0
        acc1 += s_lo * (g1 - MAGIC * x1) + z_lo * x1
        acc2 += s_hi * (g2 - MAGIC * x0) + z_hi * x0
        acc3 += s_hi * (g3 - MAGIC * x1) + z_hi * x1
    else:
        acc0 += s_lo * (g0 - (MAGIC + z_lo) * x0)
        acc1 += s_lo * (g1 - (MAGIC + z_lo) * x1)
        acc2 += s_hi * (g2 - (MAGIC + z_hi) * x0)
        acc3 += s_hi * (g3 - (MAGIC + z_hi) * x1)
    return acc0, acc1, acc2, acc3


@triton.jit
def _int4_tc_kernel(
    x_ptr, qw_ptr, z_ptr, s_ptr, out_ptr, partial_ptr, count_ptr,
    M, N, K, k_per_split, num_splits,
    stride_xm, stride_zg, stride_sg, stride_om,
    GROUP_SIZE: tl.constexpr, NT: tl.constexpr, BF16: tl.constexpr, OFFSET: tl.constexpr,
    SPLIT: tl.constexpr, TWO: tl.constexpr, EMULATE: tl.constexpr, KC: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.launch_dependents(PDL, 1)
    MAGIC: tl.constexpr = 128.0 if BF16 else 1024.0
    KT_G: tl.constexpr = GROUP_SIZE // 16
    B: tl.constexpr = NT * 32
    STEP: tl.constexpr = KC * 16  # inputs per loop step
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    # Element e of the (B,) tensors: n tile pid_n * NT + e // 32, lane e % 32 (see the module
    # docstring: contiguity 1 keeps one element per thread).
    e = tl.max_contiguous(tl.arange(0, B), 1)
    lane = e % 32
    g, t = lane // 4, lane % 4
    nt = pid_n * NT + e // 32
    nt_ok = nt < N // 16
    row = nt * 16 + g  # the lane's rows: row and row + 8
    # Words: (B, 4), row e holding element e's words of the quad's four tiles (16 bytes).
    quad = tl.arange(0, 4)
    v_ok = nt_ok[:, None]
    k_start = pid_s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    wp = (qw_ptr + (nt * (K // 64) * 128 + (k_start // 64) * 128 + lane * 4)[:, None]
          + quad[None, :])
    w0, w1, w2, w3, w4, w5, w6, w7 = _load_words(wp, v_ok & (k_start < k_end), KC, B)
    zero = tl.zeros((B,), dtype=tl.float32)
    s_lo, s_hi, z_lo, z_hi = zero, zero, zero, zero
    if GROUP_SIZE >= STEP:
        s_lo, s_hi, z_lo, z_hi = _group_params(k_start // GROUP_SIZE, row, nt_ok, s_ptr, z_ptr,
                                               stride_sg, stride_zg)
    pdl.wait(PDL)  # above: weights only; x is the previous kernel's output (kernels/pdl.py)
    # x: lane (g, t) loads x[row g][32 p + 8t .. 8t + 7] (16 bytes) as a (B, 4) row, one per
    # element like the words (a thread with several n tiles loads its x for each: L1 hits).
    x_row = g[:, None]
    x32_ptr = x_ptr.to(tl.pointer_type(tl.int32))
    stride_x32 = stride_xm // 2
    x_off = tl.multiple_of(g * stride_x32 + k_start // 2 + t * 4, 4)  # x rows 16-byte aligned
    xp_lo = x32_ptr + x_off[:, None] + quad[None, :]
    xp_hi = xp_lo + 8 * stride_x32
    x_ok_lo, x_ok_hi = x_row < M, x_row + 8 < M
    xa0, xb0, xa1, xb1, xa2, xb2, xa3, xb3, xa4, xb4, xa5, xb5, xa6, xb6, xa7, xb7 = _load_x(
        xp_lo, x_ok_lo & (k_start < k_end), KC, B)
    acc0, acc1, acc2, acc3 = zero, zero, zero, zero  # x rows (cols) 2t, 2t+1 of rows g, g+8
    acc4, acc5, acc6, acc7 = zero, zero, zero, zero  # x rows 8 + 2t, 9 + 2t (TWO)
    q0, q1, q2, q3, q4, q5, q6, q7 = zero, zero, zero, zero, zero, zero, zero, zero
    xs0, xs1, xs2, xs3 = zero, zero, zero, zero
    for k0 in range(k_start, k_end, STEP):
        kt0 = k0 // 16
        wp += KC * 32
        n0, n1, n2, n3, n4, n5, n6, n7 = _load_words(wp, v_ok & (k0 + STEP < k_end), KC, B)
        xp_lo += STEP // 2
        ya0, yb0, ya1, yb1, ya2, yb2, ya3, yb3, ya4, yb4, ya5, yb5, ya6, yb6, ya7, yb7 = _load_x(
            xp_lo, x_ok_lo & (k0 + STEP < k_end), KC, B)
        if GROUP_SIZE >= STEP:  # the next chunk's group parameters, one chunk ahead
            ns_lo, ns_hi, nz_lo, nz_hi = _group_params(
                (k0 + STEP) // GROUP_SIZE, row, nt_ok & (k0 + STEP < k_end), s_ptr, z_ptr,
                stride_sg, stride_zg)
        for j in tl.static_range(KC):
            w = _pick(j, w0, w1, w2, w3, w4, w5, w6, w7)
            if EMULATE:
                q0, q1, q2, q3, xs0, xs1 = _emulated_step(x_ptr, w, 0, kt0 + j, M, stride_xm,
                                                          q0, q1, q2, q3, xs0, xs1, MAGIC, NT)
                if TWO:
                    q4, q5, q6, q7, xs2, xs3 = _emulated_step(
                        x_ptr, w, 8, kt0 + j, M, stride_xm, q4, q5, q6, q7, xs2, xs3, MAGIC, NT)
            else:
                b0 = _pick(j, xa0, xa1, xa2, xa3, xa4, xa5, xa6, xa7)
                b1 = _pick(j, xb0, xb1, xb2, xb3, xb4, xb5, xb6, xb7)
                q0, q1, q2, q3 = _mma(w, b0, b1, q0, q1, q2, q3, BF16)
                xs0, xs1 = _mma_ones(b0, b1, xs0, xs1, BF16)
                if TWO:  # x rows 8..15: loaded here (no registers to spare for a prefetch)
                    h0, h1, h2, h3 = _split4(tl.load(xp_hi + 16 * (j // 2),
                                                     mask=x_ok_hi, other=0), B)
                    b0 = h0 if j % 2 == 0 else h2
                    b1 = h1 if j % 2 == 0 else h3
                    q4, q5, q6, q7 = _mma(w, b0, b1, q4, q5, q6, q7, BF16)
                    xs2, xs3 = _mma_ones(b0, b1, xs2, xs3, BF16)
            if GROUP_SIZE < STEP and (j + 1) % KT_G == 0:  # a group ends inside the chunk
                sl, sh, zl, zh = _group_params((k0 + j * 16) // GROUP_SIZE, row, nt_ok, s_ptr,
                                               z_ptr, stride_sg, stride_zg)
                acc0, acc1, acc2, acc3 = _update(acc0, acc1, acc2, acc3, q0, q1, q2, q3, xs0,
                                                 xs1, sl, sh, zl, zh, MAGIC, OFFSET)
                if TWO:
                    acc4, acc5, acc6, acc7 = _update(acc4, acc5, acc6, acc7, q4, q5, q6, q7,
                                                     xs2, xs3, sl, sh, zl, zh, MAGIC, OFFSET)
                q0, q1, q2, q3, q4, q5, q6, q7 = zero, zero, zero, zero, zero, zero, zero, zero
                xs0, xs1, xs2, xs3 = zero, zero, zero, zero
        if GROUP_SIZE >= STEP:
            if ((k0 + STEP) % GROUP_SIZE == 0) | (k0 + STEP >= k_end):  # a group or the split ends
                acc0, acc1, acc2, acc3 = _update(acc0, acc1, acc2, acc3, q0, q1, q2, q3, xs0,
                                                 xs1, s_lo, s_hi, z_lo, z_hi, MAGIC, OFFSET)
                if TWO:
                    acc4, acc5, acc6, acc7 = _update(acc4, acc5, acc6, acc7, q4, q5, q6, q7,
                                                     xs2, xs3, s_lo, s_hi, z_lo, z_hi, MAGIC,
                                                     OFFSET)
                q0, q1, q2, q3, q4, q5, q6, q7 = zero, zero, zero, zero, zero, zero, zero, zero
                xs0, xs1, xs2, xs3 = zero, zero, zero, zero
            s_lo, s_hi, z_lo, z_hi = ns_lo, ns_hi, nz_lo, nz_hi
        w0, w1, w2, w3, w4, w5, w6, w7 = n0, n1, n2, n3, n4, n5, n6, n7
        xa0, xa1, xa2, xa3, xa4, xa5, xa6, xa7 = ya0, ya1, ya2, ya3, ya4, ya5, ya6, ya7
        xb0, xb1, xb2, xb3, xb4, xb5, xb6, xb7 = yb0, yb1, yb2, yb3, yb4, yb5, yb6, yb7
        xp_hi += STEP // 2
    pdl.launch_dependents(PDL, 2)  # the next kernel may launch now (kernels/pdl.py)
    # lane (g, t): acc0 = out[2t, row], acc1 = out[2t+1, row], acc2/3 the same at row + 8;
    # acc4..7 the same for x rows 8 + 2t, 9 + 2t
    m_col = 2 * t
    dst, stride_dst = out_ptr, stride_om
    if SPLIT:  # this split's (M, N) slice of partial
        dst, stride_dst = partial_ptr + pid_s * M * N, N
    _store(dst, acc0, m_col, row, M, stride_dst, nt_ok, SPLIT)
    _store(dst, acc1, m_col + 1, row, M, stride_dst, nt_ok, SPLIT)
    _store(dst, acc2, m_col, row + 8, M, stride_dst, nt_ok, SPLIT)
    _store(dst, acc3, m_col + 1, row + 8, M, stride_dst, nt_ok, SPLIT)
    if TWO:
        _store(dst, acc4, m_col + 8, row, M, stride_dst, nt_ok, SPLIT)
        _store(dst, acc5, m_col + 9, row, M, stride_dst, nt_ok, SPLIT)
        _store(dst, acc6, m_col + 8, row + 8, M, stride_dst, nt_ok, SPLIT)
        _store(dst, acc7, m_col + 9, row + 8, M, stride_dst, nt_ok, SPLIT)
    if SPLIT:
        BLOCK_N: tl.constexpr = NT * 16
        BLOCK_M: tl.constexpr = 16 if TWO else 8
        rm = tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        finish_split(out_ptr, partial_ptr, count_ptr + pid_n, rm, rn, M, N, stride_om, num_splits,
                     BLOCK_M, BLOCK_N)


@triton.jit
def _store(ptr, acc, m, n, M, stride_m, n_ok, FP32: tl.constexpr):
    mask = (m < M) & n_ok
    if FP32:
        tl.store(ptr + m * stride_m + n, acc, mask=mask)
    else:
        tl.store(ptr + m * stride_m + n, acc.to(ptr.dtype.element_ty), mask=mask)


def int4_tc(x: torch.Tensor, words: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
            group_size: int, *, split_k: int | None = None, counters: torch.Tensor | None = None,
            blocks: TcBlocks | None = None, offset: bool = False,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """x (M <= 16, K) bf16/fp16 @ W^T → (M, N), W as frag_pack words (N // 16, K // 64, 32, 4),
    zeros (G, N) uint8 zero points (or float offsets with `offset`), scales (G, N).

    `counters`: int32 zeros, at least one per program along N (N // 16 always suffice); left
    zero. `out`: (M, N) in x's dtype with unit column stride (rows of a larger output), or None."""
    M, K = x.shape
    NT16, KQ = words.shape[:2]
    N = NT16 * 16
    if KQ * 64 != K or words.shape[2:] != (32, 4) or words.dtype != torch.int32:
        raise ValueError(f"words must be (N // 16, {K // 64}, 32, 4) int32 fragments, got "
                         f"{tuple(words.shape)} {words.dtype}")
    if M > 16 or x.dtype not in _MAGIC_DTYPES or not _group_ok(group_size) or K % group_size:
        raise ValueError(f"int4_tc takes M <= 16 rows of bf16/fp16 and groups of 32 or 64k "
                         f"dividing K; got {tuple(x.shape)} {x.dtype}, group {group_size}")
    if x.stride(1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16:  # 16-byte x loads
        x = x.clone(memory_format=torch.contiguous_format)
    blocks = blocks or default_blocks(M)
    n_prog = triton.cdiv(NT16, blocks.n_tiles)
    kc = _chunk_tiles(K, group_size)
    unit = 16 * kc  # splits hold whole chunks; a split ending inside a group adds its part
    units = K // unit
    if split_k is None:
        split_k = 1
        if x.is_cuda:
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count
            split_k = min(units, triton.cdiv(blocks.waves * sms, n_prog))
    if not isinstance(split_k, int) or split_k < 1:
        raise ValueError(f"split_k must be a positive integer, got {split_k!r}")
    k_split = triton.cdiv(units, split_k) * unit
    num_splits = triton.cdiv(K, k_split)
    if out is None:
        out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    elif out.shape != (M, N) or out.dtype != x.dtype or out.stride(1) != 1:
        raise ValueError(f"out must be ({M}, {N}) {x.dtype} with unit column stride")
    if M == 0:
        return out
    partial, counters = split_scratch(out, num_splits, n_prog, counters)
    _int4_tc_kernel[(n_prog, num_splits)](
        x, words, zeros, scales, out, partial, counters if counters is not None else out,
        M, N, K, k_split, num_splits, x.stride(0), zeros.stride(0), scales.stride(0),
        out.stride(0),
        GROUP_SIZE=group_size, NT=blocks.n_tiles, BF16=x.dtype == torch.bfloat16, OFFSET=offset,
        SPLIT=num_splits > 1, TWO=M > 8, EMULATE=_INTERPRETING or not x.is_cuda, KC=kc,
        num_warps=blocks.num_warps, **pdl.launch(x.device),
    )
    return out


def frag_matmul(x: torch.Tensor, words: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                group_size: int, *, counters: torch.Tensor | None = None,
                offset: bool = False) -> torch.Tensor:
    """x (M, K) @ W^T for a layer kept in fragment words, by rows: int4_tc up to TC_MAX_M (16
    per launch); int_mma dequantizing tiles of the words up to MMA_MAX_M (groups of 64 or more);
    above, W dequantized into the scratch buffer every layer shares and cuBLAS (prefill, big
    batches), as int_mma.int_dequant_matmul for the int layout. The thresholds come from timings
    of the Llama-3-8B linears (docs/benchmarks.md)."""
    M = x.shape[0]
    if M <= TC_MAX_M and x.dtype in _MAGIC_DTYPES and (x.is_cuda or _INTERPRETING):
        if M <= 16:
            return int4_tc(x, words, zeros, scales, group_size, counters=counters, offset=offset)
        out = torch.empty((M, words.shape[0] * 16), device=x.device, dtype=x.dtype)
        for i in range(0, M, 16):  # reads W once per 16 rows: still ahead of the copy here
            int4_tc(x[i:i + 16], words, zeros, scales, group_size, counters=counters,
                    offset=offset, out=out[i:i + 16])
        return out
    if (M <= MMA_MAX_M and x.dtype in _MAGIC_DTYPES and group_size % 64 == 0
            and (x.is_cuda or _INTERPRETING)):
        return int_mma.int_mma(x, words, zeros, scales, zeros, 4, group_size, counters=counters,
                               offset=offset, frag=True)
    N, K = words.shape[0] * 16, words.shape[1] * 64
    w = frag_dequantize(words, zeros, scales, group_size,
                        int_mma.dequant_scratch(N * K, x.device, x.dtype), offset)
    return torch.nn.functional.linear(x, w)
