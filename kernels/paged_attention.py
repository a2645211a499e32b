"""Decode attention over the paged KV cache: one query token per sequence.

Grid: (num_seqs, num_kv_heads, num_splits). One program owns the GROUP query heads that share a KV
head (GQA), so each K/V tile is loaded once for the whole group; the group is padded to 16 rows to
feed `tl.dot`. The context is cut into `num_splits` contiguous ranges so a small batch still fills
the GPU (split-KV / flash-decoding):

    context:  |---- split 0 ----|---- split 1 ----|-- split 2 --|
    program:  partial (max, sum, acc) per split  ->  _reduce_kernel merges them

Each range is walked in tiles of BLOCK_N tokens that may straddle cache blocks: every token's slot
is looked up in the block table, so any block_size works. With one split the decode kernel writes
the normalised output itself and the reduce step is skipped. Softmax statistics are kept in fp32,
in base 2 (the scale is pre-multiplied by log2(e)).

With `new_kv` the step's own K/V write is fused in (one graph node less per layer): the newest
position (context_len - 1) is not read from the cache but from the new key/value rows, folded
into the softmax in fp32 by the split that owns it, and that program also stores the rows into
their slot (slot < 0: padding, nothing stored). No program of the launch reads that slot, so
there is no race; later launches find it written. With `rope` as well, the query and the new key
arrive unrotated and are rotated in the kernel (one launch fewer a layer than rotary + attention).

A sliding window (`window`) starts the key range at context_len - window, so the splits cover
only the window and blocks before it are never read (they may have been released); `softcap`
(Gemma 2) maps each score s to softcap * tanh(s / softcap) before the softmax.

An fp8 cache (kernels/kv_write.py) is read as e4m3 tiles converted to the query dtype (exact: e4m3
values fit in fp16/bf16); the K scale is folded into the softmax scale and the V scale into the
output, so no tile is multiplied. The new row of a fused write is quantized first and folded in
as the cache will hold it, so fused and unfused steps agree.
"""

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from hearth.kernels import pdl
from hearth.kernels.kv_write import (
    FP8_DTYPE,
    KVScales,
    check_cache_pair,
    check_compute_dtype,
    check_scales,
    dequantize,
    quantize_fp8,
)

_LOG2E = 1.4426950408889634
# One tile (64 tokens) a split at least: short splits fill the GPU at batch 1 (docs/benchmarks.md)
_MIN_TOKENS_PER_SPLIT = 64
_MAX_SPLITS = 16
# Splits aim at this many (sequence, KV head, split) programs an SM. W1's steps of 32-63 long
# sequences ran at ≈ 60% of their floor with one split each at 2; 8 gave W1 +1.1-3.6% on two
# H100 hosts and W2 +0.6% (docs/benchmarks.md, "The decode split target"). A module setting so
# that bench/throughput.py --decode-programs-per-sm can sweep it.
_PROGRAMS_PER_SM = 8


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, out_ptr, acc_ptr, ml_ptr,
    kn_ptr, vn_ptr, slot_ptr, stride_kn, stride_knh, stride_vn, stride_vnh,
    k_scale_ptr, v_scale_ptr, pos_ptr, cs_ptr, stride_cs,
    qk_scale, block_size, stride_qs, stride_qh, stride_bt, stride_os, stride_oh,
    window, softcap,
    GROUP: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, FUSE_NEW: tl.constexpr,
    KV_FP8: tl.constexpr, ROPE: tl.constexpr, PDL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    pdl.launch_dependents(PDL, 1)
    pdl.wait(PDL)  # everything read here may come from the kernels before (kernels/pdl.py)
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ctx_len = tl.load(ctx_ptr + seq)
    lo = ctx_len * 0  # the first key the query sees
    if HAS_WINDOW:
        lo = tl.maximum(ctx_len - window, 0)
    split_len = tl.cdiv(tl.cdiv(ctx_len - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = lo + split * split_len
    end = tl.minimum(start + split_len, ctx_len)
    last = ctx_len - 1  # the newest position: from kn/vn when FUSE_NEW
    cache_end = end
    if FUSE_NEW:
        cache_end = tl.minimum(end, last)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g  # (BLOCK_G,) query heads of this group
    qmask = (g[:, None] < GROUP) & (d[None, :] < HEAD_DIM)
    q_rows = q_ptr + seq * stride_qs + heads[:, None] * stride_qh
    q = tl.load(q_rows + d[None, :], mask=qmask)
    cs_row = cs_ptr
    if ROPE:  # q (and below the new key) rotated here, at the new token's position
        cs_row = cs_ptr + tl.load(pos_ptr + seq).to(tl.int64) * stride_cs
        q = _rope(q, tl.load(q_rows + _partner(d, HEAD_DIM)[None, :], mask=qmask), d[None, :],
                  cs_row, HEAD_DIM)
    k_scale = 1.0
    v_scale = 1.0
    if KV_FP8:  # scores and output in the cache's units times the scales
        k_scale = tl.load(k_scale_ptr)
        v_scale = tl.load(v_scale_ptr)
        qk_scale = qk_scale * k_scale

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    slot_stride = NUM_KV_HEADS * HEAD_DIM
    for n0 in range(start, cache_end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,) absolute token positions
        pmask = pos < cache_end
        block_id = tl.load(bt_ptr + seq * stride_bt + pos // block_size, mask=pmask, other=0)
        slot = block_id.to(tl.int64) * block_size + pos % block_size
        kv_off = slot[:, None] * slot_stride + kv_head * HEAD_DIM + d[None, :]  # (BLOCK_N, BLOCK_D)
        kv_mask = pmask[:, None] & (d[None, :] < HEAD_DIM)
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_G, BLOCK_N)
        if SOFTCAP:
            s = soft_cap(s, softcap)
        s = tl.where(pmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    if FUSE_NEW:
        if (last >= start) & (last < end):  # this split owns the newest position
            m_i, l_i, acc = _fold_new_token(
                q, m_i, l_i, acc, kn_ptr + seq * stride_kn + kv_head * stride_knh,
                vn_ptr + seq * stride_vn + kv_head * stride_vnh, k_ptr, v_ptr, slot_ptr + seq,
                qk_scale, k_scale, v_scale, kv_head, cs_row, softcap, NUM_KV_HEADS, HEAD_DIM,
                BLOCK_D, KV_FP8, ROPE, SOFTCAP,
            )
    pdl.launch_dependents(PDL, 2)
    if KV_FP8:
        acc = acc * v_scale

    hmask = g < GROUP
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # context_len 0 -> zeros
        o_off = seq * stride_os + heads[:, None] * stride_oh + d[None, :]
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=qmask)
    else:
        # Partial buffers: acc (num_seqs, num_heads, NUM_SPLITS, HEAD_DIM), ml (2, same minus dim).
        row = (seq * (NUM_KV_HEADS * GROUP) + heads) * NUM_SPLITS + split  # (BLOCK_G,)
        tl.store(acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=qmask)
        num_rows = tl.num_programs(0) * NUM_KV_HEADS * GROUP * NUM_SPLITS
        tl.store(ml_ptr + row, m_i, mask=hmask)
        tl.store(ml_ptr + num_rows + row, l_i, mask=hmask)


@triton.jit
def _fold_new_token(
    q, m_i, l_i, acc, kn_ptr, vn_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, qk_scale, k_scale,
    v_scale, kv_head, cs_row, softcap, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, KV_FP8: tl.constexpr, ROPE: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """Online-softmax step for the one new key/value row (fp32), and its store into the cache.
    ROPE: the key is rotated first (cs_row: its position's cos | sin). fp8: the row is quantized
    next; its scores and values stay in the cache's units, as the tiles' do (qk_scale already
    holds the K scale, the caller applies the V scale)."""
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    kn = tl.load(kn_ptr + d, mask=dmask, other=0.0)
    if ROPE:
        kn = _rope(kn, tl.load(kn_ptr + _partner(d, HEAD_DIM), mask=dmask, other=0.0), d, cs_row,
                   HEAD_DIM)
    vn = tl.load(vn_ptr + d, mask=dmask, other=0.0)
    if KV_FP8:
        kn = quantize_fp8(kn, k_scale)
        vn = quantize_fp8(vn, v_scale)
    s = tl.sum(q.to(tl.float32) * kn.to(tl.float32)[None, :], 1) * qk_scale  # (BLOCK_G,)
    if SOFTCAP:
        s = soft_cap(s, softcap)
    m_new = tl.maximum(m_i, s)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new)
    acc = acc * alpha[:, None] + p[:, None] * vn.to(tl.float32)[None, :]
    slot = tl.load(slot_ptr).to(tl.int64)
    if slot >= 0:
        dst = slot * (NUM_KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM + d
        tl.store(k_cache_ptr + dst, kn.to(k_cache_ptr.dtype.element_ty), mask=dmask)
        tl.store(v_cache_ptr + dst, vn.to(v_cache_ptr.dtype.element_ty), mask=dmask)
    return m_new, l_i * alpha + p, acc


@triton.jit
def soft_cap(s, cap):
    """cap * tanh(s / cap), written with a sigmoid (tanh x = 2 sigmoid(2x) - 1). Scores here are
    in base 2 (times log2 e), so `cap` is too: the same map as on the natural-log scores."""
    return cap * (2.0 * tl.sigmoid(2.0 * s / cap) - 1.0)


@triton.jit
def _partner(d, HEAD_DIM: tl.constexpr):
    """The index rotate_half pairs with d: d + HEAD_DIM / 2 in the first half, d - it after."""
    return (d + HEAD_DIM // 2) % HEAD_DIM


@triton.jit
def _rope(x, partner, d, cs_row, HEAD_DIM: tl.constexpr):
    """Neox rotary of x (..., BLOCK_D) at one position, partner = x at _partner(d), cs_row that
    position's cos | sin (fp32): fp32 math rounded to x's dtype, as kernels/fused.py's kernel
    stores q and k."""
    HALF: tl.constexpr = HEAD_DIM // 2
    j = d % HALF
    cos = tl.load(cs_row + j, mask=d < HEAD_DIM, other=0.0)
    sin = tl.load(cs_row + HALF + j, mask=d < HEAD_DIM, other=0.0)
    xf, pf = x.to(tl.float32), partner.to(tl.float32)
    return tl.where(d < HALF, xf * cos - pf * sin, xf * cos + pf * sin).to(x.dtype)


@triton.jit
def _reduce_kernel(
    acc_ptr, ml_ptr, out_ptr, num_rows, stride_os, stride_oh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    pdl.launch_dependents(PDL, 1)
    pdl.wait(PDL)
    seq, head = tl.program_id(0), tl.program_id(1)
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    row0 = (seq * NUM_HEADS + head) * NUM_SPLITS
    smask = sp < NUM_SPLITS
    m = tl.load(ml_ptr + row0 + sp, mask=smask, other=float("-inf"))  # (BLOCK_S,)
    l_part = tl.load(ml_ptr + num_rows + row0 + sp, mask=smask, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every split empty
    w = tl.exp2(m - m_max)  # empty splits: exp2(-inf) = 0
    total = tl.sum(l_part * w, 0)
    amask = smask[:, None] & (d[None, :] < HEAD_DIM)
    acc = tl.load(acc_ptr + (row0 + sp)[:, None] * HEAD_DIM + d[None, :], mask=amask, other=0.0)
    pdl.launch_dependents(PDL, 2)
    out = tl.sum(acc * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)  # (BLOCK_D,)
    o_off = seq * stride_os + head * stride_oh + d
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@dataclass(frozen=True)
class NewKV:
    """The step's new key/value rows (num_seqs, num_kv_heads, head_dim) and their slots
    (num_seqs,) int32/int64, -1 = padding: written by the decode kernel itself."""

    key: torch.Tensor
    value: torch.Tensor
    slot_mapping: torch.Tensor


@dataclass(frozen=True)
class Rope:
    """Rotary embedding for the decode kernel: each sequence's position (num_seqs,) and the
    (max_position, head_dim) float32 cos | sin table (engine/layers/rotary.py)."""

    positions: torch.Tensor
    cos_sin_cache: torch.Tensor


@dataclass(frozen=True)
class DecodeTile:
    """Launch shape of the decode kernel: keys per tile, warps, software-pipelining depth."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2


def default_tile(head_dim: int) -> DecodeTile:
    return DecodeTile(block_n=32 if head_dim > 128 else 64)


_SM_COUNT: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # interpreter: a token parallelism so splits are exercised
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context_len: int, num_sms: int) -> int:
    """Enough splits for ~_PROGRAMS_PER_SM programs an SM, but each split keeps >=
    _MIN_TOKENS_PER_SPLIT tokens.

    max_context_len is an upper bound (block-table width * block_size) so that no host sync on
    context_lens is needed (CUDA graphs).
    """
    programs = num_seqs * num_kv_heads
    wanted = math.ceil(_PROGRAMS_PER_SM * num_sms / max(programs, 1))
    useful = math.ceil(max_context_len / _MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, useful, _MAX_SPLITS))


def _check_decode_args(query, k_cache, v_cache, block_tables, context_lens) -> None:
    check_cache_pair(k_cache, v_cache)
    _, _, num_kv_heads, head_dim = k_cache.shape
    if query.dim() != 3 or query.shape[2] != head_dim:
        raise ValueError(f"query must be (num_seqs, num_heads, {head_dim}), got {query.shape}")
    num_seqs, num_heads, _ = query.shape
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    check_compute_dtype(query, k_cache)
    if query.stride(2) != 1:
        raise ValueError("query must be contiguous in its last dimension")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"block_tables must be ({num_seqs}, max_blocks_per_seq), got {block_tables.shape}"
        )
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError("block_tables and context_lens must be int32")
    if context_lens.shape != (num_seqs,):
        raise ValueError(f"context_lens must be ({num_seqs},), got {tuple(context_lens.shape)}")
    named = {"query": query, "block_tables": block_tables, "context_lens": context_lens}
    for name, t in named.items():
        if t.device != k_cache.device:
            raise ValueError(f"{name} must be on {k_cache.device}, got {t.device}")


def _check_out(out: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty_like(query)
    if out.shape != query.shape or out.dtype != query.dtype or out.device != query.device:
        raise ValueError(f"out must be {tuple(query.shape)} {query.dtype} on {query.device}")
    if out.stride(-1) != 1:
        raise ValueError("out must be contiguous in its last dimension")
    return out


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    tile: DecodeTile | None = None,
    new_kv: NewKV | None = None,
    scales: KVScales | None = None,
    rope: Rope | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """One query token per sequence attends to its cached context -> (num_seqs, heads, dim).

    new_kv: the newest position's K/V come from these rows (the cache is not read there) and are
    stored into their slots: write_kv and attention in one launch. scales: an fp8 cache's.
    rope (with new_kv): query and new key are not rotated yet; the kernel rotates them at
    rope.positions (the key as stored in the cache), as kernels/fused.py's rotary_embedding.
    window: only the last `window` positions are read; softcap: scores soft-capped (Gemma 2)."""
    check_window_softcap(window, softcap)
    _check_decode_args(query, k_cache, v_cache, block_tables, context_lens)
    out = _check_out(out, query)
    new_k, new_v, slots = _check_new_kv(new_kv, query, k_cache)
    positions, cos_sin = _check_rope(rope, new_kv, query)
    k_scale, v_scale = check_scales(scales, k_cache)
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if num_seqs == 0:
        return out
    if num_splits is None:
        max_len = min(block_tables.shape[1] * block_size, window or 1 << 62)
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_len, _num_sms(query.device))
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    rows = num_seqs * num_heads * num_splits
    partial = num_splits > 1
    acc = query.new_empty((rows, head_dim) if partial else (1,), dtype=torch.float32)
    ml = query.new_empty((2 * rows) if partial else 1, dtype=torch.float32)  # max, sum
    group = num_heads // num_kv_heads
    tile = tile or default_tile(head_dim)
    block_tables = block_tables.contiguous()
    launch = pdl.launch(query.device, small=True)
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        query, k_cache, v_cache, block_tables, context_lens, out, acc, ml,
        new_k, new_v, slots, new_k.stride(0), new_k.stride(1), new_v.stride(0), new_v.stride(1),
        k_scale, v_scale, positions, cos_sin, cos_sin.stride(0),
        scale * _LOG2E, block_size, query.stride(0), query.stride(1),
        block_tables.stride(0), out.stride(0), out.stride(1),
        window or 0, (softcap or 1.0) * _LOG2E,
        GROUP=group, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, NUM_SPLITS=num_splits,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_N=tile.block_n,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        FUSE_NEW=new_kv is not None, KV_FP8=k_cache.dtype == FP8_DTYPE, ROPE=rope is not None,
        HAS_WINDOW=window is not None, SOFTCAP=softcap is not None,
        num_warps=tile.num_warps, num_stages=tile.num_stages, **launch,
    )
    if partial:
        _reduce_kernel[(num_seqs, num_heads)](
            acc, ml, out, rows, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=triton.next_power_of_2(head_dim),
            **launch,
        )
    return out


def check_window_softcap(window: int | None, softcap: float | None) -> None:
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap!r}")


def _check_new_kv(new_kv: NewKV | None, query: torch.Tensor, k_cache: torch.Tensor):
    """-> (key, value, slot_mapping) for the kernel; without new_kv, placeholders never read."""
    if new_kv is None:
        return query, query, query  # FUSE_NEW=False: the kernel ignores these pointers
    num_seqs, _, head_dim = query.shape
    shape = (num_seqs, k_cache.shape[2], head_dim)
    for name, t in (("new_kv.key", new_kv.key), ("new_kv.value", new_kv.value)):
        if t.shape != shape or t.dtype != query.dtype or t.stride(2) != 1:
            raise ValueError(f"{name} must be {shape} {query.dtype}, contiguous in head_dim; "
                             f"got {tuple(t.shape)} {t.dtype}")
        if t.device != k_cache.device:
            raise ValueError(f"{name} must be on {k_cache.device}, got {t.device}")
    slots = new_kv.slot_mapping
    if slots.shape != (num_seqs,) or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"new_kv.slot_mapping must be ({num_seqs},) int32/int64, got "
                         f"{tuple(slots.shape)} {slots.dtype}")
    if slots.device != k_cache.device:
        raise ValueError(f"new_kv.slot_mapping must be on {k_cache.device}")
    return new_kv.key, new_kv.value, slots.contiguous()


def _check_rope(rope: Rope | None, new_kv: NewKV | None, query: torch.Tensor):
    """-> (positions, cos_sin_cache) for the kernel; without rope, placeholders never read."""
    if rope is None:
        return query, query  # ROPE=False: the kernel ignores these pointers
    if new_kv is None:
        raise ValueError("rope needs new_kv: the new key is rotated as it is written")
    num_seqs, _, head_dim = query.shape
    pos, cache = rope.positions, rope.cos_sin_cache
    if pos.shape != (num_seqs,) or pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"rope.positions must be ({num_seqs},) int32/int64, got "
                         f"{tuple(pos.shape)} {pos.dtype}")
    if cache.dim() != 2 or cache.shape[1] != head_dim or cache.dtype != torch.float32:
        raise ValueError(f"rope.cos_sin_cache must be (max_position, {head_dim}) float32, got "
                         f"{tuple(cache.shape)} {cache.dtype}")
    if head_dim % 2 or pos.device != query.device or cache.device != query.device:
        raise ValueError("rope needs an even head_dim and its tensors on the query's device")
    return pos.contiguous(), cache.contiguous()


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence -> (length, num_kv_heads, head_dim)."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    raw = cache.view(torch.uint8) if cache.dtype == FP8_DTYPE else cache  # CUDA: no fp8 indexing
    blocks = raw[block_table[:num_blocks].long()]  # (num_blocks, block_size, kv_heads, dim)
    return blocks.flatten(0, 1)[:length].view(cache.dtype)


def paged_decode_attention_ref(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    scales: KVScales | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Torch reference: gather K/V through the block table (dequantized from fp8; only the
    window), plain fp32 softmax per sequence."""
    _check_decode_args(query, k_cache, v_cache, block_tables, context_lens)
    k_scale, v_scale = check_scales(scales, k_cache)
    out = torch.zeros_like(query)
    group = query.shape[1] // k_cache.shape[2]
    for s, length in enumerate(context_lens.tolist()):
        if length == 0:
            continue
        first = max(length - window, 0) if window else 0
        k = dequantize(gather_kv(k_cache, block_tables[s], length), k_scale)[first:]
        v = dequantize(gather_kv(v_cache, block_tables[s], length), v_scale)[first:]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", query[s].float(), k) * scale  # (num_heads, length)
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        out[s] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v).to(query.dtype)
    return out
