"""Sliding-window and soft-capped attention in the Triton decode and prefill kernels against
their torch references, on fresh random inputs (Triton's interpreter on CPU, tiny shapes). The
blocks before each window are filled with NaN and stand for released ones: a kernel that read
them would return NaN."""

import pytest
import torch
from test_kernels import DEVICE, TOL, int32, make_block_tables, make_cache

from hearth.engine.layers.rotary import RotaryEmbedding
from hearth.kernels.fused import rotary_embedding_ref
from hearth.kernels.kv_write import write_kv_ref
from hearth.kernels.paged_attention import (
    NewKV,
    Rope,
    paged_decode_attention,
    paged_decode_attention_ref,
)
from hearth.kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_ref


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _poison_released(k_cache, v_cache, tables, first_needed, block_size):
    """Copies of the caches where every block wholly before a sequence's first needed position
    holds NaN (those blocks' table entries are stale in the engine)."""
    k, v = k_cache.clone(), v_cache.clone()
    for s, first in enumerate(first_needed):
        for index in range(first // block_size):
            k[int(tables[s, index])] = float("nan")
            v[int(tables[s, index])] = float("nan")
    return k, v


@pytest.mark.parametrize("window", [1, 5, 16, 100])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize("softcap", [None, 1.5])
def test_decode_window_and_softcap_match_ref(window, num_splits, softcap):
    lens, block_size, kv_heads, group, head_dim = [1, 13, 77, 130], 8, 2, 2, 64
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    k_cache, v_cache = make_cache(num_blocks, block_size, kv_heads, head_dim)
    tables = make_block_tables(lens, block_size, num_blocks)
    query = torch.randn(len(lens), kv_heads * group, head_dim, device=DEVICE)
    ctx, scale = int32(lens), head_dim**-0.5
    ref = paged_decode_attention_ref(query, k_cache, v_cache, tables, ctx, scale, window=window,
                                     softcap=softcap)
    k_bad, v_bad = _poison_released(k_cache, v_cache, tables, [max(n - window, 0) for n in lens],
                                    block_size)
    out = paged_decode_attention(query, k_bad, v_bad, tables, ctx, scale, num_splits=num_splits,
                                 window=window, softcap=softcap)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_window_with_fused_write_and_rotary(num_splits):
    lens, block_size, kv_heads, group, head_dim, window = [3, 40, 90], 8, 2, 2, 32, 11
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    k_cache, v_cache = make_cache(num_blocks, block_size, kv_heads, head_dim)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    tables = make_block_tables(lens, block_size, num_blocks)
    qkv = torch.randn(len(lens), kv_heads * (group + 2), head_dim, device=DEVICE)
    query, key, value = qkv[:, : kv_heads * group], qkv[:, -2 * kv_heads : -kv_heads], \
        qkv[:, -kv_heads:]
    slots = torch.tensor([int(tables[s, (c - 1) // block_size]) * block_size + (c - 1) % block_size
                          for s, c in enumerate(lens)], device=DEVICE)
    positions = torch.tensor([c - 1 for c in lens], device=DEVICE)
    rope = Rope(positions, RotaryEmbedding(head_dim, 256).cos_sin_cache.to(DEVICE))
    ctx, scale = int32(lens), head_dim**-0.5
    out = paged_decode_attention(query, k_cache, v_cache, tables, ctx, scale,
                                 num_splits=num_splits, new_kv=NewKV(key, value, slots),
                                 rope=rope, window=window, softcap=2.0)
    query, key = query.clone(), key.clone()
    rotary_embedding_ref(positions, query, key, rope.cos_sin_cache, head_dim)
    write_kv_ref(key, value, k_ref, v_ref, slots)
    ref = paged_decode_attention_ref(query, k_ref, v_ref, tables, ctx, scale, window=window,
                                     softcap=2.0)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


@pytest.mark.parametrize("window", [1, 4, 9, 40])
@pytest.mark.parametrize("softcap", [None, 1.5])
def test_prefill_window_and_softcap_match_ref(window, softcap):
    # a fresh prompt, a cached prefix + chunk, a decode row, a long chunk behind a partial block
    num_new, seq_lens = [20, 7, 1, 33], [20, 30, 45, 70]
    block_size, kv_heads, group, head_dim = 8, 2, 2, 32
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 2
    k_cache, v_cache = make_cache(num_blocks, block_size, kv_heads, head_dim)
    tables = make_block_tables(seq_lens, block_size, num_blocks)
    qsl = int32([0] + torch.tensor(num_new).cumsum(0).tolist())
    query = torch.randn(sum(num_new), kv_heads * group, head_dim, device=DEVICE)
    rest = (tables, qsl, int32(seq_lens), head_dim**-0.5)
    ref = paged_prefill_attention_ref(query, k_cache, v_cache, *rest, window=window,
                                      softcap=softcap)
    first = [max(s - n - window + 1, 0) for n, s in zip(num_new, seq_lens)]
    k_bad, v_bad = _poison_released(k_cache, v_cache, tables, first, block_size)
    out = paged_prefill_attention(query, k_bad, v_bad, *rest, window=window, softcap=softcap)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


def test_window_at_least_the_context_is_full_attention():
    lens = [5, 30]
    k_cache, v_cache = make_cache(8, 8, 1, 32)
    tables = make_block_tables(lens, 8, 8)
    query = torch.randn(2, 2, 32, device=DEVICE)
    full = paged_decode_attention(query, k_cache, v_cache, tables, int32(lens), 0.2)
    windowed = paged_decode_attention(query, k_cache, v_cache, tables, int32(lens), 0.2,
                                      window=30)
    torch.testing.assert_close(windowed, full, **TOL[torch.float32])


def test_bad_window_and_softcap_are_clear():
    k_cache, v_cache = make_cache(4, 8, 1, 32)
    args = (torch.randn(1, 1, 32), k_cache, v_cache, int32([[0]]), int32([3]), 0.2)
    with pytest.raises(ValueError, match="window must be a positive int"):
        paged_decode_attention(*args, window=0)
    with pytest.raises(ValueError, match="softcap must be > 0"):
        paged_decode_attention(*args, softcap=-1.0)
