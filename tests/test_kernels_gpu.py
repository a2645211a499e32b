"""The comparisons of test_kernels.py at full shapes, compiled for a real GPU (bf16 included).

Marked `gpu`: conftest skips them on a machine without CUDA.
"""

import pytest
import torch
from test_kernels import (
    TOL,
    assert_same_bytes,
    int32,
    make_block_tables,
    make_cache,
    make_scales,
    run_decode,
    run_decode_fused_write,
)

from hearth.kernels.fused import (
    rms_norm,
    rms_norm_ref,
    rotary_embedding,
    rotary_embedding_ref,
    silu_and_mul,
    silu_and_mul_ref,
)
from hearth.kernels.kv_write import FP8_DTYPE, write_kv, write_kv_ref
from hearth.kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref
from hearth.kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_ref

pytestmark = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def random_lens(num, low, high):
    return torch.randint(low, high + 1, (num,)).tolist()


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_full(dtype):
    num_blocks, block_size, kv_heads, head_dim, num_tokens = 2048, 16, 8, 128, 4096
    k_cache, v_cache = make_cache(num_blocks, block_size, kv_heads, head_dim, dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    key, value = (torch.randn(num_tokens, kv_heads, head_dim, dtype=dtype, device="cuda")
                  for _ in range(2))
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:num_tokens]
    slots[::7] = -1
    write_kv(key, value, k_cache, v_cache, slots)
    write_kv_ref(key, value, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_fp8_full(dtype):
    """The hardware's fp32 -> e4m3 rounding (nearest even, saturated) is torch's, byte for byte,
    with a scale that is not a power of two."""
    num_blocks, block_size, kv_heads, head_dim, num_tokens = 2048, 16, 8, 128, 4096
    k_cache, v_cache = make_cache(num_blocks, block_size, kv_heads, head_dim, FP8_DTYPE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    key, value = (torch.randn(num_tokens, kv_heads, head_dim, device="cuda") * 60
                  for _ in range(2))  # some beyond 448 * scale: saturated
    key[0, 0, :64] = torch.logspace(-12, 1, 64, base=2, device="cuda")  # subnormals of e4m3
    key, value = key.to(dtype), value.to(dtype)
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:num_tokens]
    slots[::7] = -1
    scales = make_scales()
    write_kv(key, value, k_cache, v_cache, slots, scales)
    write_kv_ref(key, value, k_ref, v_ref, slots, scales)
    assert_same_bytes(k_cache, k_ref)
    assert_same_bytes(v_cache, v_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_seqs,max_len", [(64, 4096), (1, 4096), (256, 700), (3, 33)])
@pytest.mark.parametrize("group,head_dim,block_size", [(4, 128, 16), (1, 64, 32), (8, 128, 8)])
def test_decode_attention_full(dtype, num_seqs, max_len, group, head_dim, block_size):
    kv_heads = 32 // group if group > 1 else 8
    lens = random_lens(num_seqs, 1, max_len)
    lens[0] = max_len
    num_blocks = sum(-(-n // block_size) for n in lens) + 1
    k_cache, v_cache = make_cache(num_blocks, block_size, kv_heads, head_dim, dtype)
    tables = make_block_tables(lens, block_size, num_blocks)
    query = torch.randn(num_seqs, kv_heads * group, head_dim, dtype=dtype, device="cuda")
    args = (query, k_cache, v_cache, tables, int32(lens), head_dim**-0.5)
    ref = paged_decode_attention_ref(*args)
    torch.testing.assert_close(paged_decode_attention(*args), ref, **TOL[dtype])
    torch.testing.assert_close(paged_decode_attention(*args, num_splits=1), ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_seqs,max_len,num_splits", [(1, 384, None), (1, 384, 8),
                                                         (128, 1100, None), (5, 3000, 16)])
def test_decode_attention_fused_kv_write_full(dtype, num_seqs, max_len, num_splits):
    """Llama-3-8B's attention shape (32 heads over 8 KV heads, dim 128) with the K/V write fused."""
    lens = random_lens(num_seqs, 1, max_len)
    lens[0] = max_len
    run_decode_fused_write(lens, 16, 8, 4, 128, num_splits, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_seqs,max_len,num_splits", [(64, 4096, None), (1, 4096, None),
                                                         (256, 700, None), (3, 33, 1)])
@pytest.mark.parametrize("group,head_dim,block_size", [(4, 128, 16), (1, 64, 32)])
def test_decode_attention_fp8_full(dtype, num_seqs, max_len, num_splits, group, head_dim,
                                   block_size):
    kv_heads = 32 // group if group > 1 else 8
    lens = random_lens(num_seqs, 1, max_len)
    lens[0] = max_len
    run_decode(lens, block_size, kv_heads, group, head_dim, dtype, num_splits, fp8=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_seqs,max_len,num_splits", [(1, 384, 8), (128, 1100, None)])
def test_decode_attention_fp8_fused_kv_write_full(dtype, num_seqs, max_len, num_splits):
    lens = random_lens(num_seqs, 1, max_len)
    lens[0] = max_len
    run_decode_fused_write(lens, 16, 8, 4, 128, num_splits, dtype=dtype, fp8=True)


def test_decode_attention_fp8_cuda_graph_reads_scales_at_replay():
    """Scales are tensors: a graph captured with one value replays with the value they hold."""
    k_cache, v_cache = make_cache(512, 16, 8, 128, FP8_DTYPE)
    tables = make_block_tables([2048] * 4, 16, 512)
    query = torch.randn(4, 32, 128, dtype=torch.bfloat16, device="cuda")
    lens, out, scales = int32([5, 100, 2048, 1]), torch.empty_like(query), make_scales()
    args = (query, k_cache, v_cache, tables, lens, 128**-0.5 / 4)
    paged_decode_attention(*args, out=out, scales=scales)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(*args, out=out, scales=scales)
    lens.copy_(int32([1500, 7, 33, 2000]))
    scales.k.fill_(0.25)
    scales.v.fill_(3.0)
    graph.replay()
    torch.cuda.synchronize()
    ref = paged_decode_attention_ref(*args, scales)
    torch.testing.assert_close(out, ref, **TOL[torch.bfloat16])


def test_decode_attention_cuda_graph_replay():
    """The launcher does no host sync: it captures, and replays correctly with new lengths."""
    k_cache, v_cache = make_cache(512, 16, 8, 128, torch.bfloat16)
    tables = make_block_tables([2048] * 4, 16, 512)
    query = torch.randn(4, 32, 128, dtype=torch.bfloat16, device="cuda")
    lens, out = int32([5, 100, 2048, 1]), torch.empty_like(query)
    args = (query, k_cache, v_cache, tables, lens, 128**-0.5)
    paged_decode_attention(*args, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(*args, out=out)
    lens.copy_(int32([1500, 7, 33, 2000]))
    graph.replay()
    torch.cuda.synchronize()
    ref = paged_decode_attention_ref(*args)
    torch.testing.assert_close(out, ref, **TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group,head_dim,block_size", [(4, 128, 16), (1, 64, 32), (3, 64, 8)])
def test_prefill_attention_full(dtype, group, head_dim, block_size):
    args = _prefill_case(dtype, group, head_dim, block_size, dtype, head_dim**-0.5)
    out = paged_prefill_attention(*args)
    torch.testing.assert_close(out, paged_prefill_attention_ref(*args), **TOL[dtype])


def _prefill_case(dtype, group, head_dim, block_size, cache_dtype, scale):
    """Prefill chunks over long cached prefixes plus decode rows, at full shapes."""
    kv_heads = 8 if group != 3 else 3
    num_new = random_lens(12, 1, 512) + [1] * 8  # prefill chunks and decode rows
    cached = random_lens(20, 0, 3500)
    seq_lens = [c + n for c, n in zip(cached, num_new, strict=True)]
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 1
    k_cache, v_cache = make_cache(num_blocks, block_size, kv_heads, head_dim, cache_dtype)
    tables = make_block_tables(seq_lens, block_size, num_blocks)
    qsl = int32([0] + torch.tensor(num_new).cumsum(0).tolist())
    query = torch.randn(sum(num_new), kv_heads * group, head_dim, dtype=dtype, device="cuda")
    return query, k_cache, v_cache, tables, qsl, int32(seq_lens), scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group,head_dim,block_size", [(4, 128, 16), (3, 64, 8)])
def test_prefill_attention_fp8_full(dtype, group, head_dim, block_size):
    args = _prefill_case(dtype, group, head_dim, block_size, FP8_DTYPE, head_dim**-0.5 / 4)
    scales = make_scales()
    out = paged_prefill_attention(*args, scales=scales)
    torch.testing.assert_close(out, paged_prefill_attention_ref(*args, scales), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [4096, 576, 8192])
def test_rms_norm_full(dtype, hidden):
    x = torch.randn(2048, hidden, dtype=dtype, device="cuda")
    residual, weight = torch.randn_like(x), torch.randn(hidden, device="cuda")
    torch.testing.assert_close(
        rms_norm(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5), **TOL[dtype]
    )
    out, new_res = rms_norm(x, weight, 1e-6, residual)
    out_ref, res_ref = rms_norm_ref(x, weight, 1e-6, residual)
    torch.testing.assert_close(out, out_ref, **TOL[dtype])
    torch.testing.assert_close(new_res, res_ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_full(dtype):
    num_tokens, heads, kv_heads, head_dim = 4096, 32, 8, 128
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device="cuda")
    expected = qkv.clone()
    cos_sin = torch.randn(8192, head_dim, device="cuda")
    positions = torch.randint(0, 8192, (num_tokens,), device="cuda")
    sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    q, k, _ = qkv.split(sizes, dim=-1)
    rotary_embedding(positions, q, k, cos_sin, head_dim)
    q_ref, k_ref, _ = expected.split(sizes, dim=-1)
    rotary_embedding_ref(positions, q_ref, k_ref, cos_sin, head_dim)
    torch.testing.assert_close(qkv, expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_full(dtype):
    x = torch.randn(2048, 2 * 14336, dtype=dtype, device="cuda")
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), **TOL[dtype])
