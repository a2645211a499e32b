"""Varlen causal attention for a batch of new tokens over the paged KV cache (chunked prefill).

The new tokens' K/V are already in the cache (write_kv runs first), so every key is read through
the block table, whether it was cached by an earlier chunk, a prefix-cache hit, or this step:

    sequence s:  |<----- cached: seq_len - num_new ----->|<-- num_new new tokens -->|
    query i of s sits at position seq_len - num_new + i and sees keys at positions <= its own.

Decode rows (num_new = 1) are just short sequences, so one launch serves a mixed batch.

Grid: (query tiles, num_kv_heads). A tile holds BLOCK_Q consecutive new tokens of one sequence times
the GROUP query heads that share a KV head, flattened into BLOCK_M = BLOCK_Q * GROUP (padded) rows:

    row r  ->  token local_tile * BLOCK_Q + r // GROUP,  head kv_head * GROUP + r % GROUP

Sequence s owns tiles [qsl[s] // BLOCK_Q + s, ...): the grid size needs no host sync, and a program
finds its sequence by binary search over query_start_loc. Flash-attention style online softmax in
fp32 (base 2) over BLOCK_N-key tiles, which may straddle cache blocks.

A sliding window (`window`): query at position p sees keys p - window < k <= p, and a tile's
key loop starts at its first query's window (blocks before it are never read). `softcap` (Gemma 2)
maps each score s to softcap * tanh(s / softcap) before the mask.

An fp8 cache is read as in kernels/paged_attention.py: tiles converted to the query dtype, the K
scale folded into the softmax scale and the V scale into the output.
"""

import torch
import triton
import triton.language as tl

from hearth.kernels.kv_write import (
    FP8_DTYPE,
    KVScales,
    check_cache_pair,
    check_compute_dtype,
    check_scales,
    dequantize,
)
from hearth.kernels.paged_attention import check_window_softcap, gather_kv, soft_cap

_LOG2E = 1.4426950408889634


@triton.jit
def _find_seq(qsl_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """Largest s with qsl[s] // BLOCK_Q + s <= tile (the sequence that owns this tile)."""
    lo = num_seqs * 0  # an int32 scalar, the type the loop carries
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
        if first_tile <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit(do_not_specialize=["num_seqs"])  # one binary per serving run, any batch
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, qsl_ptr, seq_lens_ptr, out_ptr, k_scale_ptr, v_scale_ptr,
    qk_scale, block_size, num_seqs, stride_qt, stride_qh, stride_bt, stride_ot, stride_oh,
    window, softcap,
    GROUP: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr, HAS_WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    tile, kv_head = tl.program_id(0), tl.program_id(1)
    seq = _find_seq(qsl_ptr, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(qsl_ptr + seq)
    num_new = tl.load(qsl_ptr + seq + 1) - q_start
    local_tile = tile - (q_start // BLOCK_Q + seq)
    if local_tile * BLOCK_Q >= num_new:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_start = seq_len - num_new  # position of the first new token
    kv_end = ctx_start + tl.minimum(local_tile * BLOCK_Q + BLOCK_Q, num_new)  # last query pos + 1

    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    tok = local_tile * BLOCK_Q + r // GROUP  # (BLOCK_M,) token index within the sequence
    heads = kv_head * GROUP + r % GROUP
    rmask = (r < BLOCK_Q * GROUP) & (tok < num_new)
    # Padding rows see every key, so no row's softmax is empty (they are never stored).
    q_pos = tl.where(rmask, ctx_start + tok, kv_end - 1)
    qmask = rmask[:, None] & (d[None, :] < HEAD_DIM)
    q_off = (q_start + tok)[:, None].to(tl.int64) * stride_qt + heads[:, None] * stride_qh
    q = tl.load(q_ptr + q_off + d[None, :], mask=qmask, other=0.0)  # (BLOCK_M, BLOCK_D)
    if KV_FP8:  # scores and output in the cache's units times the scales
        qk_scale = qk_scale * tl.load(k_scale_ptr)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    first_key = kv_end * 0
    if HAS_WINDOW:  # the tile's first query sees keys from first - window + 1 on
        first_key = tl.maximum(ctx_start + local_tile * BLOCK_Q - window + 1, 0)
    for n0 in range(first_key // BLOCK_N * BLOCK_N, kv_end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,) key positions
        pmask = (pos < kv_end) & (pos >= first_key)  # released blocks are never loaded
        block_id = tl.load(bt_ptr + seq * stride_bt + pos // block_size, mask=pmask, other=0)
        slot = block_id.to(tl.int64) * block_size + pos % block_size
        kv_off = slot[:, None] * (NUM_KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM + d[None, :]
        kv_mask = pmask[:, None] & (d[None, :] < HEAD_DIM)
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0).to(q.dtype)  # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        if SOFTCAP:
            s = soft_cap(s, softcap)
        causal = pmask[None, :] & (pos[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            causal = causal & (pos[None, :] > q_pos[:, None] - window)
        s = tl.where(causal, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
        if HAS_WINDOW:  # a row may see no key of this tile yet: exp2(-inf - -inf) would be NaN
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if KV_FP8:
        acc = acc * tl.load(v_scale_ptr)
    out = acc / l_i[:, None]
    o_off = (q_start + tok)[:, None].to(tl.int64) * stride_ot + heads[:, None] * stride_oh
    tl.store(out_ptr + o_off + d[None, :], out.to(out_ptr.dtype.element_ty), mask=qmask)


def _check_prefill_args(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens) -> None:
    check_cache_pair(k_cache, v_cache)
    _, _, num_kv_heads, head_dim = k_cache.shape
    if query.dim() != 3 or query.shape[2] != head_dim:
        raise ValueError(f"query must be (num_tokens, num_heads, {head_dim}), got {query.shape}")
    if query.shape[1] % num_kv_heads != 0:
        raise ValueError(f"num_heads {query.shape[1]} is not a multiple of {num_kv_heads}")
    check_compute_dtype(query, k_cache)
    if query.stride(2) != 1:
        raise ValueError("query must be contiguous in its last dimension")
    num_seqs = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    if num_seqs < 0 or query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(
            f"seq_lens must be (num_seqs,) and query_start_loc (num_seqs + 1,), got "
            f"{tuple(seq_lens.shape)} and {tuple(query_start_loc.shape)}"
        )
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must be ({num_seqs}, max_blocks), got {block_tables.shape}")
    for name, t in (("block_tables", block_tables), ("query_start_loc", query_start_loc),
                    ("seq_lens", seq_lens)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
    for name, t in (("query", query), ("block_tables", block_tables),
                    ("query_start_loc", query_start_loc), ("seq_lens", seq_lens)):
        if t.device != k_cache.device:
            raise ValueError(f"{name} must be on {k_cache.device}, got {t.device}")


def _tile_sizes(group: int, head_dim: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_M rows, BLOCK_N keys). Small tiles in the interpreter keep the CPU tests fast."""
    block_m = 64 if device.type == "cuda" else 16
    block_n = (64 if head_dim <= 128 else 32) if device.type == "cuda" else 16
    return max(block_m, triton.next_power_of_2(group)), block_n


def paged_prefill_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    scales: KVScales | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention of the new tokens over their whole context -> (num_tokens, heads, dim).
    scales: an fp8 cache's; window: each query sees its last `window` positions only; softcap:
    scores soft-capped (Gemma 2)."""
    _check_prefill_args(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens)
    check_window_softcap(window, softcap)
    k_scale, v_scale = check_scales(scales, k_cache)
    if out is None:
        out = torch.empty_like(query)
    elif out.shape != query.shape or out.dtype != query.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(query.shape)} {query.dtype}, last dim contiguous")
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    block_m, block_n = _tile_sizes(group, head_dim, query.device)
    block_q = block_m // group
    num_tiles = triton.cdiv(num_tokens, block_q) + num_seqs  # upper bound, see module docstring
    block_tables = block_tables.contiguous()
    _prefill_kernel[(num_tiles, num_kv_heads)](
        query, k_cache, v_cache, block_tables, query_start_loc.contiguous(), seq_lens, out,
        k_scale, v_scale, scale * _LOG2E, block_size, num_seqs, query.stride(0), query.stride(1),
        block_tables.stride(0), out.stride(0), out.stride(1),
        window or 0, (softcap or 1.0) * _LOG2E,
        GROUP=group, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_M=block_m,
        BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(head_dim),
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        KV_FP8=k_cache.dtype == FP8_DTYPE, HAS_WINDOW=window is not None,
        SOFTCAP=softcap is not None, num_warps=4, num_stages=2,
    )
    return out


def paged_prefill_attention_ref(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    scales: KVScales | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Torch reference: per sequence, gather its K/V (dequantized from fp8) and run masked fp32
    softmax attention (window and soft-cap as transformers applies them)."""
    _check_prefill_args(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens)
    k_scale, v_scale = check_scales(scales, k_cache)
    out = torch.empty_like(query)
    group = query.shape[1] // k_cache.shape[2]
    starts = query_start_loc.tolist()
    for s, seq_len in enumerate(seq_lens.tolist()):
        q = query[starts[s] : starts[s + 1]].float()  # (num_new, num_heads, head_dim)
        if q.shape[0] == 0:
            continue
        k = dequantize(gather_kv(k_cache, block_tables[s], seq_len), k_scale)
        v = dequantize(gather_kv(v_cache, block_tables[s], seq_len), v_scale)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        q_pos = torch.arange(seq_len - q.shape[0], seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        visible = k_pos <= q_pos[:, None]  # (new, len)
        if window:
            visible &= k_pos > q_pos[:, None] - window
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~visible, float("-inf"))
        out_s = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
        out[starts[s] : starts[s + 1]] = out_s.to(query.dtype)
    return out
