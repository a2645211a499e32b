"""The CPU attention backend (engine/attention.py, TorchAttention) against a direct per-sequence
computation: decode over gathered blocks, decode of one sequence on consecutive blocks (read in
place, no gather), padded contexts of different lengths, and prefill after a cached prefix (a
few new tokens take the folded-heads path, more the repeated-K/V one)."""

from __future__ import annotations

import pytest
import torch

from hearth.engine.attention import AttentionMetadata, TorchAttention

BLOCK, KV_HEADS, GROUP, HEAD_DIM = 16, 3, 3, 64


def _direct(q, k, v, num_prefix: int) -> torch.Tensor:
    """q (Lq, H, D), k/v (Lk, Hkv, D): causal with the queries at num_prefix + i, float64."""
    k = k.double().repeat_interleave(GROUP, dim=1)
    v = v.double().repeat_interleave(GROUP, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * HEAD_DIM**-0.5
    pos = torch.arange(q.shape[0])[:, None] + num_prefix
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).float()


def _run(tables: list[list[int]], seq_lens: list[int], query_lens: list[int], seed: int):
    """Fill the cache with each sequence's context through its table, attend, compare."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = max(max(t) for t in tables) + 1
    shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    ctx = [(torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen),
            torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen)) for n in seq_lens]
    slots, q_rows, new_k, new_v = [], [], [], []
    for table, n, q_len, (k, v) in zip(tables, seq_lens, query_lens, ctx, strict=True):
        for p in range(n - q_len):  # the cached part, written directly
            block, offset = table[p // BLOCK], p % BLOCK
            k_cache[block, offset], v_cache[block, offset] = k[p], v[p]
        slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(n - q_len, n)]
        new_k.append(k[n - q_len:])
        new_v.append(v[n - q_len:])
        q_rows.append(torch.randn(q_len, KV_HEADS * GROUP, HEAD_DIM, generator=gen))
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        query_start_loc=torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()],
                                     dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        query_lens_cpu=query_lens, seq_lens_cpu=seq_lens,
        max_query_len=max(query_lens), max_seq_len=max(seq_lens))
    q = torch.cat(q_rows)
    out = TorchAttention().forward(q, torch.cat(new_k), torch.cat(new_v), (k_cache, v_cache), meta,
                                   HEAD_DIM**-0.5)
    start = 0
    for q_len, n, (k, v), qs in zip(query_lens, seq_lens, ctx, q_rows, strict=True):
        torch.testing.assert_close(out[start:start + q_len], _direct(qs, k, v, n - q_len),
                                   rtol=1e-4, atol=1e-4)
        start += q_len
    return meta


@pytest.mark.parametrize("seq_len", [1, 16, 37, 64])
def test_decode_one_sequence_on_consecutive_blocks_reads_in_place(seq_len):
    first = 5
    table = list(range(first, first + -(-seq_len // BLOCK)))
    meta = _run([table], [seq_len], [1], seed=seq_len)
    assert meta.cpu_step_cache["block_run"] == first  # no gather was needed


@pytest.mark.parametrize("seq_len", [17, 37, 64])
def test_decode_one_sequence_on_scattered_blocks(seq_len):
    table = [9, 2, 7, 4][: -(-seq_len // BLOCK)]
    meta = _run([table], [seq_len], [1], seed=seq_len)
    assert meta.cpu_step_cache["block_run"] is None


def test_decode_batch_of_different_lengths_is_masked():
    meta = _run([[3, 4, 5], [0], [8, 1]], [40, 5, 20], [1, 1, 1], seed=1)
    assert meta.cpu_step_cache["padding_mask"].shape == (3, 1, 1, 40)


def test_prefill_after_a_cached_prefix_and_a_fresh_prompt():
    _run([[2, 6, 3], [0, 1]], [45, 20], [13, 20], seed=2)


@pytest.mark.parametrize("query_len", [1, 2, 9, 64, 65, 200])
def test_new_tokens_after_a_long_cached_prefix(query_len):
    """A keystroke's few tokens after a cached file (the folded-heads path up to 64 queries, the
    repeated-K/V path above), against the direct computation."""
    seq_len = 300 + query_len
    blocks = list(range((seq_len + BLOCK - 1) // BLOCK))[::-1]  # scattered: descending
    _run([blocks], [seq_len], [query_len], seed=query_len)


def test_new_tokens_of_two_sequences_after_cached_prefixes():
    _run([[5, 1, 9, 2], [0, 3, 4]], [60, 40], [3, 7], seed=11)


@pytest.mark.parametrize("query_len", [4, 9, 100])
def test_new_tokens_on_consecutive_blocks_read_the_cache_in_place(query_len):
    """A speculative verification or a chat's next turn on consecutive blocks: the context is
    read as a view of the cache (no gather); a scattered table is gathered; both against the
    direct computation."""
    seq_len = 200 + query_len
    count = -(-seq_len // BLOCK)
    meta = _run([list(range(4, 4 + count)), [0, 1, 2]], [seq_len, 40], [query_len, 3], seed=7)
    assert meta.cpu_step_cache[("context_run", 0, 0)] == (4, count)
    assert meta.cpu_step_cache[("context_run", 1, 0)] == (0, 3)
    scattered = _run([list(range(count))[::-1]], [seq_len], [query_len], seed=7)
    assert scattered.cpu_step_cache[("context_run", 0, 0)] is None
