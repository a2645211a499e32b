"""TritonAttention: the CUDA attention backend over the paged KV cache (same interface as
TorchAttention in engine/attention.py).

    decode-only batch:  paged_decode_attention with the K/V write and the rotary embedding
                        fused in (GQA-grouped, split-KV; no host sync, so it runs inside a CUDA
                        graph; one launch per layer where rotary + write_kv + attention took
                        three)
    anything else:      rotary_embedding (q, k in place), write_kv (new K/V into their slots;
                        slot -1 = padding, writes nothing), then paged_prefill_attention (varlen
                        causal over the paged context; decode rows of a mixed batch are
                        one-token sequences)

The layer hands over q and k unrotated with `rope` = (positions, cos_sin_cache) because
`rotates` is set (engine/models/llama.py); without `rope` they are taken as already rotated.

`fuse_kv_write` (class default, read when a backend is made) turns the fusion off: the
benchmark's baseline sets it before building the engine, whose graphs capture the choice.

A layer's sliding window and soft-cap (Gemma 2) go to every kernel as they are.

An fp8 cache (engine/kv_cache.py's LayerKVCache) brings its layer's scales; every kernel takes
them (tensors, so the captured graphs read their current values).
"""

from __future__ import annotations

import torch

from hearth.engine.attention import AttentionMetadata
from hearth.engine.kv_cache import LayerKVCache
from hearth.kernels.fused import rotary_embedding
from hearth.kernels.kv_write import write_kv
from hearth.kernels.paged_attention import NewKV, Rope, paged_decode_attention
from hearth.kernels.prefill_attention import paged_prefill_attention


class TritonAttention:
    fuse_kv_write: bool = True
    rotates = True  # forward takes `rope` and rotates q and k itself

    def __init__(self) -> None:
        self.fuse_kv_write = type(self).fuse_kv_write

    def forward(
        self,
        q: torch.Tensor,  # (num_tokens, num_heads, head_dim), may be a strided view of qkv
        k: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim)
        v: torch.Tensor,
        kv_cache: LayerKVCache | tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        scale: float,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,  # (positions, cos_sin_cache)
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        k_cache, v_cache = kv_cache
        extra = {"window": window, "softcap": softcap}
        scales = getattr(kv_cache, "scales", None)  # a plain (k, v) pair: not fp8, none
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous, unlike q
        if meta.is_decode_only and self.fuse_kv_write:
            new_kv = NewKV(k, v, meta.slot_mapping)
            return paged_decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, out=out,
                new_kv=new_kv, scales=scales, rope=None if rope is None else Rope(*rope), **extra,
            )
        if rope is not None:
            rotary_embedding(rope[0], q, k, rope[1], q.shape[-1])
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping, scales)
        if meta.is_decode_only:
            return paged_decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, out=out,
                scales=scales, **extra,
            )
        return paged_prefill_attention(
            q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, scale,
            out=out, scales=scales, **extra,
        )
