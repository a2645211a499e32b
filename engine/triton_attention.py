"""TritonAttention: the CUDA attention backend over the paged KV cache (same interface as
TorchAttention in engine/attention.py).

    write_kv (new K/V into their slots; slot -1 = padding, writes nothing)
      -> decode-only batch:  paged_decode_attention (GQA-grouped, split-KV; no host sync, so it
                             runs inside a CUDA graph)
      -> anything else:      paged_prefill_attention (varlen causal over the paged context; decode
                             rows of a mixed batch are one-token sequences)
"""

from __future__ import annotations

import torch

from engine.attention import AttentionMetadata
from kernels.kv_cache import write_kv
from kernels.paged_attention import paged_decode_attention
from kernels.prefill_attention import paged_prefill_attention


class TritonAttention:
    def forward(
        self,
        q: torch.Tensor,  # (num_tokens, num_heads, head_dim), may be a strided view of qkv
        k: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim)
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        k_cache, v_cache = kv_cache
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous, unlike q
        if meta.is_decode_only:
            return paged_decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, out=out
            )
        return paged_prefill_attention(
            q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, scale,
            out=out,
        )
