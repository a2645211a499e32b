"""Paged attention: metadata for one batch, and the backend that runs it (torch on CPU, Triton on
CUDA).

KV cache layout, per layer (the kernels in kernels/ use the same):

    k_cache, v_cache: (num_blocks, block_size, num_kv_heads, head_dim)
    token at position p of a sequence -> block block_table[p // block_size], offset p % block_size
    slot = block_id * block_size + offset

A batch is flat: the new tokens of every scheduled sequence, one after another. Sequence s owns rows
query_start_loc[s] : query_start_loc[s + 1]; its context after this step is seq_lens[s] tokens, the
last (query_start_loc[s + 1] - query_start_loc[s]) of them new. Prefill, chunked prefill,
prefix-cache hits and decode are all this one shape.

Per layer, two options change the scores (both as transformers computes them):
- `window` (sliding-window attention): the query at position p sees keys p - window < k <= p;
  K/V before the window are never read (their blocks may be freed: engine/block_manager.py);
- `softcap` (Gemma 2): scores -> softcap * tanh(scores / softcap) before the mask and softmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (num_tokens,) int64: where each new token's K/V goes
    query_start_loc: torch.Tensor  # (num_seqs + 1,) int32
    seq_lens: torch.Tensor  # (num_seqs,) int32: context length after this step
    block_tables: torch.Tensor  # (num_seqs, max_blocks) int32, padded with 0
    # Host copies, so the CPU path never synchronizes to read lengths.
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int
    # CPU decode: what every layer of one step shares, built by the first (padding mask, block run)
    cpu_step_cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class TorchAttention:
    """Reference backend: gather each sequence's K/V through its block table, then SDPA.

    This is what the Triton kernels are checked against, and the CPU path of the engine."""

    rotates = False  # q and k arrive rotated (TritonAttention rotates them itself)

    def forward(
        self,
        q: torch.Tensor,  # (num_tokens, num_heads, head_dim)
        k: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim)
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        k_cache, v_cache = kv_cache
        write_kv_torch(k, v, k_cache, v_cache, meta.slot_mapping)
        scores = _Scores(scale, window, softcap)
        if meta.is_decode_only:  # plain matmuls: SDPA's CPU math path is slow for one query row
            return _decode_batched(q, k_cache, v_cache, meta, scores)
        out = torch.empty_like(q)
        start = 0
        for s, (q_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
            qs = q[start : start + q_len]
            first = scores.first_key(seq_len - q_len, k_cache.shape[1])
            if q_len == seq_len:  # nothing cached before this chunk: attend to the new K/V directly
                ks, vs = k[start : start + q_len], v[start : start + q_len]
            else:
                ks, vs = _context(k_cache, v_cache, meta, s, seq_len, first)
                ks, vs = ks.to(q.dtype), vs.to(q.dtype)  # a float16 cache under float32
            out[start : start + q_len] = _attend(qs, ks, vs, scores, seq_len - q_len,
                                                 first if q_len != seq_len else 0)
            start += q_len
        return out


@dataclass(frozen=True)
class _Scores:
    """How a layer turns q.k into attention weights."""

    scale: float
    window: int | None = None
    softcap: float | None = None

    def first_key(self, first_query_pos: int, block_size: int) -> int:
        """The first position any of these queries sees, rounded down to its block."""
        if self.window is None:
            return 0
        return max(0, first_query_pos - self.window + 1) // block_size * block_size

    def capped(self, s: torch.Tensor) -> torch.Tensor:
        return s if self.softcap is None else torch.tanh(s / self.softcap) * self.softcap


def write_kv_torch(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    flat_k = k_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    flat_v = v_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    # a cache of another dtype (float16 under the native CPU kernels' float32 model) rounds the
    # new K/V to nearest, as the native step's writes do
    flat_k.index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    flat_v.index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def _context(
    k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, s: int, seq_len: int,
    first: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence s's K/V at positions first..seq_len-1: views of the cache in place when its blocks
    there are consecutive (a chat's next turn, a speculative verification: the block manager
    hands out blocks in order), else gathered. Same values and strides either way; the check
    runs once a step for every layer (meta.cpu_step_cache)."""
    if k_cache.device.type != "cpu":  # reading the table would synchronize with the device
        return _gather(k_cache, v_cache, meta.block_tables[s], seq_len, first)
    block_size = k_cache.shape[1]
    key = ("context_run", s, first)
    if key not in meta.cpu_step_cache:
        table = meta.block_tables[s, first // block_size : -(-seq_len // block_size)].tolist()
        start = _run_start(table)
        meta.cpu_step_cache[key] = None if start is None else (start, len(table))
    run = meta.cpu_step_cache[key]
    if run is None:
        return _gather(k_cache, v_cache, meta.block_tables[s], seq_len, first)
    start, count = run
    length = seq_len - first
    ks = k_cache[start : start + count].flatten(0, 1)[:length]
    vs = v_cache[start : start + count].flatten(0, 1)[:length]
    return ks, vs


def _gather(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int,
    first: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions first..seq_len-1 (first: a block boundary) -> (seq_len - first, kv_heads, dim)."""
    block_size = k_cache.shape[1]
    blocks = block_table[first // block_size : (seq_len + block_size - 1) // block_size]
    # (num_blocks_used, block_size, kv_heads, head_dim) -> (seq_len - first, kv_heads, head_dim)
    ks = _gather_blocks(k_cache, blocks).flatten(0, 1)[: seq_len - first]
    vs = _gather_blocks(v_cache, blocks).flatten(0, 1)[: seq_len - first]
    return ks, vs


def _gather_blocks(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """cache[blocks] for any shape of `blocks`, as whole-row index_select (2-3x faster on CPU
    than advanced indexing)."""
    rows = cache.view(cache.shape[0], -1).index_select(0, blocks.reshape(-1))
    return rows.view(*blocks.shape, *cache.shape[1:])


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scores: _Scores, num_prefix: int,
    first: int = 0,
) -> torch.Tensor:
    """q: (q_len, H, D), k/v: (kv_len, Hkv, D) at positions first..; query i sits at position
    num_prefix + i."""
    q_len, kv_len = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    if (group > 1 and 0 < num_prefix and q_len <= _FOLD_MAX_QUERIES and scores.window is None
            and scores.softcap is None):
        return _attend_folded(q, k, v, scores.scale, num_prefix)
    if group > 1:  # repeat K/V per query head: SDPA's enable_gqa runs the slow math path on CPU
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    # (1, heads, len, D): SDPA's fused CPU kernel takes 4-D inputs only
    qt, kt, vt = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    scale = scores.scale
    if scores.window is None and scores.softcap is None:
        if q_len == 1:
            out = F.scaled_dot_product_attention(qt, kt, vt, scale=scale)
        elif num_prefix == 0:
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale)
        else:
            q_pos = torch.arange(num_prefix, num_prefix + q_len, device=q.device)
            mask = torch.arange(kv_len, device=q.device)[None, :] <= q_pos[:, None]
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
        return out[0].transpose(0, 1)  # (q_len, H, D)
    q_pos = torch.arange(num_prefix, num_prefix + q_len, device=q.device)[:, None]
    k_pos = torch.arange(first, first + kv_len, device=q.device)[None, :]
    visible = k_pos <= q_pos  # (q_len, kv_len)
    if scores.window is not None:
        visible &= k_pos > q_pos - scores.window
    return _masked_attention(qt, kt, vt, scores, visible)[0].transpose(0, 1)


# A few new tokens after a cached prefix (a keystroke's completion, a short chat turn): fold the
# query heads of each KV head into the query length instead of repeating K/V per head. Measured
# per layer on the 2-core box (bf16, 9 query / 3 KV heads, 1,884 keys): 19 queries 1.00 -> 0.61
# ms, 4 queries 1.73 -> 0.49 ms, 128 queries 4.50 -> 3.77 ms; at 300 queries over 600 keys the
# fold loses (2.45 -> 3.52 ms), hence the bound. Outputs are equal bit for bit (same SDPA kernel).
_FOLD_MAX_QUERIES = 64


def _attend_folded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   num_prefix: int) -> torch.Tensor:
    """Causal attention of q (q_len, H, D) after `num_prefix` cached positions, over k/v
    (kv_len, Hkv, D) from position 0, as (1, Hkv, group * q_len, D) queries: rows (g, i)."""
    q_len, num_heads, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[0]
    group = num_heads // kv_heads
    qg = q.reshape(q_len, kv_heads, group, dim).permute(1, 2, 0, 3).reshape(
        1, kv_heads, group * q_len, dim)
    kt, vt = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
    q_pos = torch.arange(num_prefix, num_prefix + q_len, device=q.device).repeat(group)
    mask = torch.arange(kv_len, device=q.device)[None, :] <= q_pos[:, None]
    out = F.scaled_dot_product_attention(qg, kt, vt, attn_mask=mask, scale=scale)
    return out[0].reshape(kv_heads, group, q_len, dim).permute(2, 0, 1, 3).reshape(
        q_len, num_heads, dim)


def _masked_attention(q, k, v, scores: _Scores, visible: torch.Tensor) -> torch.Tensor:
    """Eager attention as transformers runs it with soft-capping: scores (capped), masked,
    softmax in float32, weights cast back. q: (..., Lq, D), k/v: (..., Lk, D)."""
    s = scores.capped(torch.matmul(q, k.transpose(-1, -2)) * scores.scale)
    s = s.masked_fill(~visible, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)


def _decode_batched(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
    scores: _Scores,
) -> torch.Tensor:
    """All rows are decode tokens: gather every context padded to the longest, one masked pass.

    The GQA group is folded into the query length — (seqs, kv_heads, group, head_dim) against
    (seqs, kv_heads, context, head_dim) — so SDPA takes its fused CPU kernel with no K/V
    repetition (its `enable_gqa` path falls back to the slow math kernel on CPU). With a window
    only the blocks from the earliest window start on are gathered."""
    if scores.window is not None or scores.softcap is not None:
        return _decode_windowed(q, k_cache, v_cache, meta, scores)
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    max_len = meta.max_seq_len
    num_blocks = (max_len + block_size - 1) // block_size
    first = _block_run(meta, num_blocks)
    if first is not None:  # one sequence on consecutive blocks: attend to the cache in place
        ks = k_cache[first : first + num_blocks].flatten(0, 1)[None, :max_len].transpose(1, 2)
        vs = v_cache[first : first + num_blocks].flatten(0, 1)[None, :max_len].transpose(1, 2)
    else:  # (S, Hkv, L, D) gathered, cut to the longest context
        tables = meta.block_tables[:, :num_blocks]
        ks = _gather_blocks(k_cache, tables).flatten(1, 2)[:, :max_len].transpose(1, 2)
        vs = _gather_blocks(v_cache, tables).flatten(1, 2)[:, :max_len].transpose(1, 2)
    ks, vs = ks.to(q.dtype), vs.to(q.dtype)  # a float16 cache under a float32 model
    qg = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)  # (S, Hkv, G, D)
    out = F.scaled_dot_product_attention(qg, ks, vs, attn_mask=_padding_mask(meta, q.dtype),
                                         scale=scores.scale)
    return out.reshape(num_seqs, num_heads, head_dim)


def _decode_windowed(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
    scores: _Scores,
) -> torch.Tensor:
    """Decode rows with a window and/or soft-capping: keys from the earliest window start on."""
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    first = scores.first_key(min(meta.seq_lens_cpu) - 1, block_size)
    num_blocks = -(-meta.max_seq_len // block_size)
    tables = meta.block_tables[:, first // block_size : num_blocks]
    length = meta.max_seq_len - first
    # (S, Hkv, L, D) from position `first` on
    ks = _gather_blocks(k_cache, tables).flatten(1, 2)[:, :length].transpose(1, 2)
    vs = _gather_blocks(v_cache, tables).flatten(1, 2)[:, :length].transpose(1, 2)
    ks, vs = ks.to(q.dtype), vs.to(q.dtype)
    q_pos = meta.seq_lens.to(torch.int64)[:, None] - 1  # (S, 1)
    k_pos = torch.arange(first, meta.max_seq_len, device=q.device)[None, :]  # (1, L)
    visible = k_pos <= q_pos
    if scores.window is not None:
        visible &= k_pos > q_pos - scores.window
    qg = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)  # (S, Hkv, G, D)
    out = _masked_attention(qg, ks, vs, scores, visible[:, None, None, :])
    return out.reshape(num_seqs, num_heads, head_dim)


def _padding_mask(meta: AttentionMetadata, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive (S, 1, 1, L) mask hiding the padding of contexts shorter than the longest; built
    once per batch (every layer shares it), None when all contexts are equally long."""
    if min(meta.seq_lens_cpu) == meta.max_seq_len:
        return None
    cached = meta.cpu_step_cache.get("padding_mask")
    if cached is None or cached.dtype != dtype:
        lens = meta.seq_lens.to(torch.int64)
        pad = torch.arange(meta.max_seq_len, device=lens.device)[None, :] >= lens[:, None]
        cached = torch.zeros(pad.shape, dtype=dtype, device=lens.device)
        cached.masked_fill_(pad, float("-inf"))
        cached = cached[:, None, None, :]
        meta.cpu_step_cache["padding_mask"] = cached
    return cached


def _block_run(meta: AttentionMetadata, num_blocks: int) -> int | None:
    """A batch of one sequence whose blocks are consecutive (the usual case for a single user:
    the free list hands out blocks in order): its first block, else None. Once per step."""
    if "block_run" not in meta.cpu_step_cache:
        meta.cpu_step_cache["block_run"] = (
            _run_start(meta.block_tables[0, :num_blocks].tolist()) if meta.num_seqs == 1
            else None)
    return meta.cpu_step_cache["block_run"]


def _run_start(table: list[int]) -> int | None:
    """The first block of a table that is one run of consecutive blocks, else None."""
    if table and table == list(range(table[0], table[0] + len(table))):
        return table[0]
    return None
