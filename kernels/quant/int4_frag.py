"""4-bit weights as mma fragment words (the layout kernels/quant/int4_tc.py multiplies): packing at
load, its inverse, and the dequantized copy for large M.

Layout (int4_tc.py has the why). W (N, K) is cut into 16 x 16 tiles; lane l (g = l // 4,
t = l % 4) of tile (nt, kt) holds one int32 word, its A fragment of `mma.m16n8k16.row.col`:
registers a0..a3 = rows (g, g+8, g, g+8) x k slots (2t, 2t, 2t+8, 2t+8) + (0, 1); value e of a_r
at nibble r + 4e. In the 32 inputs of tile pair (2p, 2p + 1), lane t's slots of tile 2p + h
hold inputs 32p + 8t + 4h + (0, 1, 2, 3). Words are stored (N/16, K/64, 32, 4): a lane's words
of four consecutive tiles side by side.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# W (N, K) viewed as (nt, row // 8, g, p, t, h, k8, e): row = 8 (row // 8) + g,
# k = 32 p + 8 t + 4 h + 2 k8 + e; tile kt = 2 p + h, register r = 2 k8 + row // 8.
_TO_FRAG = (0, 3, 5, 2, 4, 6, 1, 7)  # -> (nt, p, h, g, t, k8, row // 8, e)


def frag_pack(q: torch.Tensor) -> torch.Tensor:
    """4-bit values q (K, N) (the int layout's words unpacked, 0..15) → fragment words
    (N // 16, K // 64, 32, 4) int32."""
    K, N = q.shape
    if K % 64 or N % 16:
        raise ValueError(f"fragment packing needs K % 64 == 0 and N % 16 == 0, got {K} x {N}")
    if q.min() < 0 or q.max() > 15:
        raise ValueError("fragment packing takes 4-bit values in [0, 15]")
    w = q.t().reshape(N // 16, 2, 8, K // 32, 4, 2, 2, 2).permute(*_TO_FRAG)
    vals = w.reshape(N // 16, K // 16, 32, 4, 2).to(torch.int32)  # nt, kt, lane, r, e
    words = torch.zeros(N // 16, K // 16, 32, dtype=torch.int32, device=q.device)
    for r in range(4):
        for e in range(2):
            words |= vals[..., r, e] << (4 * (r + 4 * e))
    return words.reshape(N // 16, K // 64, 4, 32).transpose(2, 3).contiguous()


def frag_unpack(words: torch.Tensor) -> torch.Tensor:
    """frag_pack's inverse: words (N // 16, K // 64, 32, 4) → q (K, N) int32 (tests)."""
    NT, KQ, _, _ = words.shape
    w = words.transpose(2, 3).reshape(NT, KQ * 4, 32)
    vals = torch.stack([(w >> (4 * p)) & 0xF for p in range(8)], dim=-1)  # nibble p = r + 4e
    vals = vals.reshape(NT, KQ * 4, 32, 2, 4).transpose(-1, -2)  # nt, kt, lane, r, e
    vals = vals.reshape(NT, KQ * 2, 2, 8, 4, 2, 2, 2)  # nt, p, h, g, t, k8, row // 8, e
    inverse = [_TO_FRAG.index(i) for i in range(8)]
    w = vals.permute(*inverse)  # nt, row // 8, g, p, t, h, k8, e
    return w.reshape(NT * 16, KQ * 64).t().contiguous()


@triton.jit
def frag_tile(qw_ptr, nt, kq, N, K, NTB: tl.constexpr, KQB: tl.constexpr):
    """4-bit values (NTB * 16 rows, KQB * 64 inputs) int32 of n tiles nt and quads kq from the
    fragment words: 16-byte word loads, nibbles unpacked in registers, put in (row, k) order by
    one permute (Triton moves them through shared memory)."""
    lane_j = tl.arange(0, 128)  # lane * 4 + j
    offs = (nt[:, None, None] * (K // 64) + kq[None, :, None]) * 128 + lane_j[None, None, :]
    ok = (nt < N // 16)[:, None, None] & (kq < K // 64)[None, :, None]
    words = tl.load(qw_ptr + offs, mask=ok, other=0)  # (NTB, KQB, 128)
    p = tl.arange(0, 8)
    q = (words[:, :, :, None] >> (4 * p)[None, None, None, :]) & 0xF  # nibble p = r + 4e
    # (nt, kq, g, t, jh, h, e, k8, r8) -> (nt, r8, g, kq, jh, t, h, k8, e)
    q = tl.reshape(q, (NTB, KQB, 8, 4, 2, 2, 2, 2, 2))
    q = tl.permute(q, (0, 8, 2, 1, 4, 3, 5, 7, 6))
    return tl.reshape(q, (NTB * 16, KQB * 64))


@triton.jit
def _frag_dequant_kernel(qw_ptr, z_ptr, s_ptr, w_ptr, N, K, stride_zg, stride_sg,
                         GROUP_SIZE: tl.constexpr, OFFSET: tl.constexpr, NTB: tl.constexpr,
                         KQB: tl.constexpr):
    """W (N, K) in w's dtype from the fragment words of NTB n tiles x KQB quads (64 inputs),
    coalesced stores."""
    nt = tl.program_id(0) * NTB + tl.arange(0, NTB)
    kq = tl.program_id(1) * KQB + tl.arange(0, KQB)
    q = frag_tile(qw_ptr, nt, kq, N, K, NTB, KQB).to(tl.float32)
    row = tl.program_id(0) * NTB * 16 + tl.arange(0, NTB * 16)
    k = tl.program_id(1) * KQB * 64 + tl.arange(0, KQB * 64)
    mask = (row < N)[:, None] & (k < K)[None, :]
    grp = k // GROUP_SIZE
    s = tl.load(s_ptr + grp[None, :] * stride_sg + row[:, None], mask=mask, other=0.0)
    z = tl.load(z_ptr + grp[None, :] * stride_zg + row[:, None], mask=mask, other=0)
    if OFFSET:
        w = q * s.to(tl.float32) + z.to(tl.float32)
    else:
        w = (q - z.to(tl.float32)) * s.to(tl.float32)
    tl.store(w_ptr + row[:, None] * K + k[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


DEQUANT_TILES = (2, 4, 4)  # frag_dequantize: n tiles, 64-input quads, warps a program
# True: _frag_dequant_direct_kernel, lanes store their own 16-byte runs (no permute through
# shared memory). Off until it is timed on a GPU (docs/benchmarks.md).
DEQUANT_DIRECT = False


def frag_dequantize(words: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                    group_size: int, out: torch.Tensor, offset: bool = False,
                    tiles: tuple[int, int, int] | None = None,
                    direct: bool | None = None) -> torch.Tensor:
    """W (N, K) from fragment words into `out` (N * K elements of the wanted dtype; a view of
    the shared dequant scratch on CUDA). `tiles`: n tiles, 64-input quads and warps a program."""
    N, K = words.shape[0] * 16, words.shape[1] * 64
    w = out.view(N, K)
    ntb, kqb, warps = tiles or DEQUANT_TILES
    kernel = _frag_dequant_direct_kernel if (DEQUANT_DIRECT if direct is None else direct) \
        else _frag_dequant_kernel
    kernel[(triton.cdiv(N // 16, ntb), triton.cdiv(K // 64, kqb))](
        words, zeros, scales, w, N, K, zeros.stride(0), scales.stride(0),
        GROUP_SIZE=group_size, OFFSET=offset, NTB=ntb, KQB=kqb, num_warps=warps,
    )
    return w


@triton.jit
def _frag_dequant_direct_kernel(qw_ptr, z_ptr, s_ptr, w_ptr, N, K, stride_zg, stride_sg,
                                GROUP_SIZE: tl.constexpr, OFFSET: tl.constexpr,
                                NTB: tl.constexpr, KQB: tl.constexpr):
    """Like _frag_dequant_kernel, without the permute: each lane stores its own values, 8
    consecutive inputs (16 bytes) of rows g and g + 8 for each pair of its four tiles."""
    nt = tl.program_id(0) * NTB + tl.arange(0, NTB)
    kq = tl.program_id(1) * KQB + tl.arange(0, KQB)
    lane = tl.arange(0, 32)
    j = tl.arange(0, 4)
    offs = ((nt[:, None, None, None] * (K // 64) + kq[None, :, None, None]) * 128
            + lane[None, None, :, None] * 4 + j[None, None, None, :])
    ok = (nt < N // 16)[:, None, None, None] & (kq < K // 64)[None, :, None, None]
    words = tl.load(qw_ptr + offs, mask=ok, other=0)  # (NTB, KQB, 32, 4): j = 2 jh + h
    words = tl.reshape(words, (NTB, KQB, 32, 2, 1, 2, 1, 1))  # nt, kq, lane, jh, r8, h, k8, e
    r8 = tl.arange(0, 2)[None, None, None, None, :, None, None, None]
    k8 = tl.arange(0, 2)[None, None, None, None, None, None, :, None]
    e = tl.arange(0, 2)[None, None, None, None, None, None, None, :]
    q = (words >> (4 * (2 * k8 + r8 + 4 * e))) & 0xF  # (NTB, KQB, 32, 2, 2, 2, 2, 2)
    q = tl.reshape(q, (NTB, KQB, 32, 2, 2, 8)).to(tl.float32)  # nt, kq, lane, jh, r8, kk
    g = (lane // 4)[None, None, :, None, None, None]
    t = (lane % 4)[None, None, :, None, None, None]
    two = tl.arange(0, 2)
    row = nt[:, None, None, None, None, None] * 16 + 8 * two[None, None, None, None, :, None] + g
    k8s = (kq[None, :, None, None, None, None] * 64 + 32 * two[None, None, None, :, None, None]
           + 8 * t)
    k = k8s + tl.arange(0, 8)[None, None, None, None, None, :]  # 8 inputs, one group (8 | group)
    mask = (row < N) & (k < K)
    grp = k8s // GROUP_SIZE
    s_ok = (row < N) & (k8s < K)
    s = tl.load(s_ptr + grp * stride_sg + row, mask=s_ok, other=0.0)  # (..., 1): per 8 inputs
    z = tl.load(z_ptr + grp * stride_zg + row, mask=s_ok, other=0)
    if OFFSET:
        w = q * s.to(tl.float32) + z.to(tl.float32)
    else:
        w = (q - z.to(tl.float32)) * s.to(tl.float32)
    tl.store(w_ptr + row * K + k, w.to(w_ptr.dtype.element_ty), mask=mask)
