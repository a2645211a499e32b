"""The attention and K/V-cache Triton kernels against their torch references, on fresh random
inputs (the small fused kernels: tests/test_fused_kernels.py).

On a machine without CUDA the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET),
so shapes are tiny; tests/test_kernels_gpu.py repeats the comparisons at full size on a GPU.
"""

import pytest
import torch
import torch.nn.functional as F

from hearth.engine.layers.rotary import RotaryEmbedding
from hearth.kernels.fused import rotary_embedding_ref
from hearth.kernels.kv_write import FP8_DTYPE, FP8_MAX, KVScales, dequantize, write_kv, write_kv_ref
from hearth.kernels.paged_attention import (
    NewKV,
    Rope,
    paged_decode_attention,
    paged_decode_attention_ref,
)
from hearth.kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"
TOL = {
    torch.float32: {"atol": 2e-5, "rtol": 1e-4},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype=torch.float32):
    """Random caches; fp8 ones hold e4m3 values of randn * 4 (so some are subnormal, some > 8)."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    if dtype == FP8_DTYPE:
        return tuple((4 * torch.randn(shape, device=DEVICE)).to(FP8_DTYPE) for _ in range(2))
    k = torch.randn(shape, dtype=dtype, device=DEVICE)
    return k, torch.randn(shape, dtype=dtype, device=DEVICE)


def make_scales():
    """K and V scales of an fp8 cache. Triton's interpreter rounds fp32 -> fp8 wrongly (no carry
    into the exponent, no ties-to-even, subnormals truncated), so on CPU the scales are powers of
    two and written values exact e4m3 multiples of them (fp8_exact): nothing is rounded there.
    On a GPU they are arbitrary and everything is rounded by the hardware."""
    k, v = (0.5, 2.0) if INTERPRETED else (0.37, 1.7)
    return KVScales(*(torch.tensor(x, device=DEVICE) for x in (k, v)))


def fp8_exact(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x on the interpreter: a value the write stores without rounding (e4m3 value * scale)."""
    if not INTERPRETED:
        return x
    return ((x.float() / scale).to(FP8_DTYPE).float() * scale).to(x.dtype)


def assert_same_bytes(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def make_block_tables(seq_lens, block_size, num_blocks, max_blocks=None):
    """Shuffled, distinct blocks per sequence; padded with 0 like the engine's tables."""
    needed = [-(-n // block_size) for n in seq_lens]
    max_blocks = max_blocks or max(max(needed), 1)
    perm = torch.randperm(num_blocks).tolist()
    assert sum(needed) <= num_blocks, "test setup: not enough cache blocks"
    table = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    for s, n in enumerate(needed):
        table[s, :n] = torch.tensor(perm[:n], dtype=torch.int32)
        perm = perm[n:]
    return table.to(DEVICE)


def int32(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


# ------------------------------------------------------------------------------------ write_kv
@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_write_kv_matches_ref_and_skips_padding(block_size, slot_dtype):
    num_blocks, kv_heads, head_dim, num_tokens = 6, 2, 64, 11
    k_cache, v_cache = make_cache(num_blocks, block_size, kv_heads, head_dim)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    # key/value as views of a fused qkv projection: non-contiguous token stride
    qkv = torch.randn(num_tokens, 4 + 2 * kv_heads, head_dim, device=DEVICE)
    key, value = qkv[:, 4 : 4 + kv_heads], qkv[:, 4 + kv_heads :]
    slots = torch.randperm(num_blocks * block_size)[:num_tokens].to(slot_dtype)
    slots[[2, 7]] = -1
    slots = slots.to(DEVICE)
    write_kv(key, value, k_cache, v_cache, slots)
    write_kv_ref(key, value, k_ref, v_ref, slots)
    torch.testing.assert_close(k_cache, k_ref, rtol=0, atol=0)
    torch.testing.assert_close(v_cache, v_ref, rtol=0, atol=0)


def test_write_kv_rejects_bad_input():
    k_cache, v_cache = make_cache(4, 8, 2, 64)
    key = torch.randn(3, 2, 64, device=DEVICE)
    slots = torch.arange(3, device=DEVICE)
    with pytest.raises(ValueError, match="key"):
        write_kv(key[:, :1], key, k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv(key, key, k_cache, v_cache, slots.float())
    with pytest.raises(ValueError, match="v_cache"):
        write_kv(key, key, k_cache, v_cache.half(), slots)
    with pytest.raises(ValueError, match="only to an fp8 cache"):
        write_kv(key, key, k_cache, v_cache, slots, make_scales())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_fp8_quantizes_saturates_and_skips_padding(dtype):
    """x / scale rounded to e4m3, saturated at +-448 (never inf/NaN), padding rows untouched."""
    num_blocks, block_size, kv_heads, head_dim, num_tokens = 6, 8, 2, 64, 11
    k_cache, v_cache = make_cache(num_blocks, block_size, kv_heads, head_dim, FP8_DTYPE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    scales = make_scales()
    qkv = (torch.randn(num_tokens, 4 + 2 * kv_heads, head_dim, device=DEVICE) * 30).to(dtype)
    key, value = qkv[:, 4 : 4 + kv_heads], qkv[:, 4 + kv_heads :]  # views of a fused projection
    key.copy_(fp8_exact(key, scales.k))
    value.copy_(fp8_exact(value, scales.v))
    qkv[0, 4:, :2] = torch.tensor([1e4, -1e4], device=DEVICE) * scales.v  # beyond e4m3's range
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[[2, 7]] = -1
    slots = slots.to(DEVICE)
    write_kv(key, value, k_cache, v_cache, slots, scales)
    write_kv_ref(key, value, k_ref, v_ref, slots, scales)
    assert_same_bytes(k_cache, k_ref)
    assert_same_bytes(v_cache, v_ref)
    flat_v = v_cache.view(-1, kv_heads, head_dim)
    assert flat_v[slots[0], :, 0].float().tolist() == [FP8_MAX] * kv_heads
    assert flat_v[slots[0], :, 1].float().tolist() == [-FP8_MAX] * kv_heads
    assert torch.isfinite(v_cache.float()).all() and torch.isfinite(k_cache.float()).all()


def test_write_kv_fp8_rejects_missing_or_bad_scales():
    k_cache, v_cache = make_cache(4, 8, 2, 64, FP8_DTYPE)
    key = torch.randn(3, 2, 64, device=DEVICE)
    slots = torch.arange(3, device=DEVICE)
    with pytest.raises(ValueError, match="needs its scales"):
        write_kv(key, key, k_cache, v_cache, slots)
    bad = KVScales(torch.ones(2, device=DEVICE), torch.ones((), device=DEVICE))
    with pytest.raises(ValueError, match="scales.k"):
        write_kv(key, key, k_cache, v_cache, slots, bad)
    bad = KVScales(torch.ones((), device=DEVICE), torch.ones((), dtype=torch.float64))
    with pytest.raises(ValueError, match="scales.v"):
        write_kv(key, key, k_cache, v_cache, slots, bad)


def test_fp8_reference_error_is_e4m3_rounding():
    """The torch reference math (CPU): attention over the fp8-quantized cache stays within e4m3's
    rounding of attention over the float cache. e4m3 rounds each value to within 2^-4 relative
    (RMS 2^-4 / sqrt(3) = 3.6%) and attention averages rows, so the output's relative error is
    below that (2.8% measured); with a scale, values up to 448 * scale survive."""
    num_blocks, block_size, kv_heads, head_dim, group = 40, 16, 2, 64, 4
    lens = [1, 37, 300, 129]
    shape = (num_blocks, block_size, kv_heads, head_dim)
    for scale in (1.0, 8.0):
        k_f, v_f = (scale * 30 * torch.randn(shape) for _ in range(2))  # up to ~150 * scale
        k_8, v_8 = (torch.zeros(shape, dtype=FP8_DTYPE) for _ in range(2))
        scales = KVScales(torch.tensor(scale), torch.tensor(scale))
        slots = torch.arange(num_blocks * block_size)
        flat = (-1, kv_heads, head_dim)
        write_kv_ref(k_f.view(flat), v_f.view(flat), k_8, v_8, slots, scales)
        rel = (dequantize(k_8, scales.k) - k_f).norm() / k_f.norm()
        assert 0.01 < rel < 0.04, rel  # rounded (not a copy), and to e4m3's precision
        tables = make_block_tables(lens, block_size, num_blocks).cpu()
        query = torch.randn(len(lens), kv_heads * group, head_dim) / (30 * scale)
        ctx = torch.tensor(lens, dtype=torch.int32)
        exact = paged_decode_attention_ref(query, k_f, v_f, tables, ctx, head_dim**-0.5)
        fp8 = paged_decode_attention_ref(query, k_8, v_8, tables, ctx, head_dim**-0.5, scales)
        assert (fp8 - exact).norm() / exact.norm() < 0.05


# ------------------------------------------------------------------------------ decode attention
def run_decode(context_lens, block_size, num_kv_heads, group, head_dim, dtype=torch.float32,
               num_splits=None, fp8=False):
    """fp8: the cache is e4m3 with scales; `dtype` is the query's."""
    num_blocks = sum(-(-n // block_size) for n in context_lens) + 3
    cache_dtype = FP8_DTYPE if fp8 else dtype
    k_cache, v_cache = make_cache(num_blocks, block_size, num_kv_heads, head_dim, cache_dtype)
    scales = make_scales() if fp8 else None
    tables = make_block_tables(context_lens, block_size, num_blocks)
    query = torch.randn(
        len(context_lens), num_kv_heads * group, head_dim, dtype=dtype, device=DEVICE
    )
    ctx, scale = int32(context_lens), head_dim**-0.5 / (4 if fp8 else 1)
    out = paged_decode_attention(query, k_cache, v_cache, tables, ctx, scale,
                                 num_splits=num_splits, scales=scales)
    ref = paged_decode_attention_ref(query, k_cache, v_cache, tables, ctx, scale, scales)
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize(
    "block_size,num_kv_heads,group,head_dim",
    [(8, 2, 1, 64), (16, 2, 2, 64), (16, 1, 4, 128), (32, 1, 8, 64), (16, 3, 3, 64)],
)
def test_decode_attention_matches_ref(block_size, num_kv_heads, group, head_dim):
    run_decode([1, 13, 77, 130], block_size, num_kv_heads, group, head_dim)


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_decode_attention_split_kv(num_splits):
    # 5 splits of a 37-token context leave some splits empty; context 0 (padding row) gives zeros.
    run_decode([37, 300, 3, 0], 16, 2, 2, 64, num_splits=num_splits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_attention_half_precision(dtype):
    if dtype == torch.bfloat16 and INTERPRETED:
        pytest.skip("Triton's interpreter miscomputes bf16 tl.dot; covered by test_kernels_gpu.py")
    run_decode([19, 70], 16, 1, 4, 64, dtype=dtype, num_splits=2)


def run_decode_fused_write(context_lens, block_size, num_kv_heads, group, head_dim, num_splits,
                           dtype=torch.float32, fp8=False, rope=False):
    """Decode with the new token's K/V fused in == write_kv_ref then the reference attention; the
    cache ends up as write_kv_ref leaves it. The slot of the newest position holds stale random
    values before the call, so reading it instead of the new rows would fail. fp8: an e4m3 cache,
    the new rows quantized by the kernel exactly as write_kv_ref does. rope: query and key arrive
    unrotated and the kernel rotates them (reference: rotary_embedding_ref first)."""
    num_blocks = sum(-(-n // block_size) for n in context_lens) + 3
    cache_dtype = FP8_DTYPE if fp8 else dtype
    k_cache, v_cache = make_cache(num_blocks, block_size, num_kv_heads, head_dim, cache_dtype)
    scales = make_scales() if fp8 else None
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    tables = make_block_tables(context_lens, block_size, num_blocks)
    n = len(context_lens)
    qkv = torch.randn(n, num_kv_heads * (group + 2), head_dim, dtype=dtype, device=DEVICE)
    if fp8:  # K/V of the cache's magnitude; on the interpreter, exactly representable
        qkv[:, num_kv_heads * group :] *= 4
        qkv[:, num_kv_heads * group : -num_kv_heads] = fp8_exact(
            qkv[:, num_kv_heads * group : -num_kv_heads], scales.k)
        qkv[:, -num_kv_heads:] = fp8_exact(qkv[:, -num_kv_heads:], scales.v)
    query = qkv[:, : num_kv_heads * group]  # strided views of one projection, as in the model
    key, value = qkv[:, num_kv_heads * group : -num_kv_heads], qkv[:, -num_kv_heads:]
    slots = [int(tables[s, (c - 1) // block_size]) * block_size + (c - 1) % block_size
             if c > 0 else -1 for s, c in enumerate(context_lens)]
    slots = torch.tensor(slots, device=DEVICE)
    ctx, scale = int32(context_lens), head_dim**-0.5 / (4 if fp8 else 1)
    new_kv = NewKV(key, value, slots)
    rotary = None
    if rope:
        positions = torch.tensor([max(c - 1, 0) for c in context_lens], device=DEVICE)
        rotary = Rope(positions, RotaryEmbedding(head_dim, 1024).cos_sin_cache.to(DEVICE))
    out = paged_decode_attention(query, k_cache, v_cache, tables, ctx, scale,
                                 num_splits=num_splits, new_kv=new_kv, scales=scales,
                                 rope=rotary)
    if rope:
        query, key = query.clone(), key.clone()
        rotary_embedding_ref(rotary.positions, query, key, rotary.cos_sin_cache, head_dim)
    write_kv_ref(key, value, k_ref, v_ref, slots, scales)
    ref = paged_decode_attention_ref(query, k_ref, v_ref, tables, ctx, scale, scales)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    if rope and not fp8:  # a GPU may fuse the rotation's multiply-adds: not bit-exact there
        torch.testing.assert_close(k_cache, k_ref, **TOL[dtype])
    else:
        assert_same_bytes(k_cache, k_ref)
    assert_same_bytes(v_cache, v_ref)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize(
    "block_size,num_kv_heads,group,head_dim", [(8, 2, 1, 64), (16, 1, 4, 128), (16, 3, 3, 64)]
)
def test_decode_attention_fused_kv_write(num_splits, block_size, num_kv_heads, group, head_dim):
    # 1 (only the new token), a partial last block, the new token first in a split, padding (0)
    run_decode_fused_write([1, 13, 65, 130, 0], block_size, num_kv_heads, group, head_dim,
                           num_splits)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_size,num_kv_heads,group,head_dim", [(8, 2, 1, 64), (16, 2, 4, 128)])
def test_decode_attention_fused_rotary(num_splits, dtype, block_size, num_kv_heads, group,
                                       head_dim):
    """Query and new key rotated inside the decode kernel == rotary, write_kv, attention."""
    run_decode_fused_write([1, 13, 65, 130, 0], block_size, num_kv_heads, group, head_dim,
                           num_splits, dtype=dtype, rope=True)


def test_decode_attention_fp8_fused_rotary():
    if INTERPRETED:  # rotated keys are not e4m3-exact, and the interpreter rounds them differently
        pytest.skip("the interpreter's fp8 rounding differs from torch's; covered on the GPU")
    run_decode_fused_write([1, 13, 65, 130, 0], 16, 2, 2, 64, 3, fp8=True, rope=True)


def test_decode_attention_fused_rotary_rejects_bad_input():
    k_cache, v_cache = make_cache(4, 8, 2, 64)
    query = torch.randn(2, 4, 64, device=DEVICE)
    tables, ctx = make_block_tables([5, 9], 8, 4), int32([5, 9])
    key, slots = torch.randn(2, 2, 64, device=DEVICE), torch.tensor([4, 8], device=DEVICE)
    table = torch.zeros(16, 64, device=DEVICE)
    with pytest.raises(ValueError, match="rope needs new_kv"):
        paged_decode_attention(query, k_cache, v_cache, tables, ctx, 1.0,
                               rope=Rope(int32([4, 8]), table))
    with pytest.raises(ValueError, match="rope.positions"):
        paged_decode_attention(query, k_cache, v_cache, tables, ctx, 1.0,
                               new_kv=NewKV(key, key, slots), rope=Rope(int32([4]), table))
    with pytest.raises(ValueError, match="cos_sin_cache"):
        paged_decode_attention(query, k_cache, v_cache, tables, ctx, 1.0,
                               new_kv=NewKV(key, key, slots),
                               rope=Rope(int32([4, 8]), table[:, :8]))


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_attention_fp8_cache(num_splits, dtype):
    run_decode([1, 13, 77, 130, 0], 16, 2, 2, 64, dtype=dtype, num_splits=num_splits, fp8=True)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize(
    "block_size,num_kv_heads,group,head_dim", [(8, 2, 1, 64), (16, 1, 4, 128)]
)
def test_decode_attention_fp8_fused_kv_write(num_splits, block_size, num_kv_heads, group, head_dim):
    run_decode_fused_write([1, 13, 65, 130, 0], block_size, num_kv_heads, group, head_dim,
                           num_splits, fp8=True)


def test_decode_attention_fp8_rejects_bad_input():
    k_cache, v_cache = make_cache(4, 8, 2, 64, FP8_DTYPE)
    query = torch.randn(2, 4, 64, device=DEVICE)
    tables, ctx = make_block_tables([5, 9], 8, 4), int32([5, 9])
    with pytest.raises(ValueError, match="needs its scales"):
        paged_decode_attention(query, k_cache, v_cache, tables, ctx, 1.0)
    with pytest.raises(ValueError, match="dtype"):
        paged_decode_attention(query.double(), k_cache, v_cache, tables, ctx, 1.0,
                               scales=make_scales())


def test_decode_attention_fused_kv_write_rejects_bad_input():
    k_cache, v_cache = make_cache(4, 8, 2, 64)
    query = torch.randn(2, 4, 64, device=DEVICE)
    tables, ctx = make_block_tables([5, 9], 8, 4), int32([5, 9])
    key = torch.randn(2, 2, 64, device=DEVICE)
    slots = torch.tensor([4, 8], device=DEVICE)
    with pytest.raises(ValueError, match="new_kv.key"):
        paged_decode_attention(query, k_cache, v_cache, tables, ctx, 1.0,
                               new_kv=NewKV(key[:, :1], key, slots))
    with pytest.raises(ValueError, match="slot_mapping"):
        paged_decode_attention(query, k_cache, v_cache, tables, ctx, 1.0,
                               new_kv=NewKV(key, key, slots[:1]))


def test_decode_attention_writes_into_out():
    k_cache, v_cache = make_cache(8, 8, 2, 64)
    tables, lens = make_block_tables([9, 20], 8, 8), int32([9, 20])
    query = torch.randn(2, 4, 64, device=DEVICE)
    out = torch.empty_like(query)
    assert paged_decode_attention(query, k_cache, v_cache, tables, lens, 0.3, out=out) is out
    ref = paged_decode_attention_ref(query, k_cache, v_cache, tables, lens, 0.3)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    with pytest.raises(ValueError, match="out"):
        paged_decode_attention(query, k_cache, v_cache, tables, lens, 0.3, out=out[:1])


def test_decode_attention_rejects_bad_input():
    k_cache, v_cache = make_cache(4, 8, 2, 64)
    query = torch.randn(2, 4, 64, device=DEVICE)
    tables, ctx = make_block_tables([5, 9], 8, 4), int32([5, 9])
    with pytest.raises(ValueError, match="multiple"):
        paged_decode_attention(query[:, :3], k_cache, v_cache, tables, ctx, 1.0)
    with pytest.raises(ValueError, match="dtype"):
        paged_decode_attention(query.double(), k_cache, v_cache, tables, ctx, 1.0)
    with pytest.raises(ValueError, match="int32"):
        paged_decode_attention(query, k_cache, v_cache, tables.long(), ctx, 1.0)
    with pytest.raises(ValueError, match="context_lens"):
        paged_decode_attention(query, k_cache, v_cache, tables, ctx[:1], 1.0)
    with pytest.raises(ValueError, match="k_cache"):
        paged_decode_attention(query, k_cache[0], v_cache, tables, ctx, 1.0)


# ----------------------------------------------------------------------------- prefill attention
def run_prefill(num_new, seq_lens, block_size, num_kv_heads, group, head_dim, fp8=False):
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 2
    cache_dtype = FP8_DTYPE if fp8 else torch.float32
    k_cache, v_cache = make_cache(num_blocks, block_size, num_kv_heads, head_dim, cache_dtype)
    tables = make_block_tables(seq_lens, block_size, num_blocks)
    qsl = int32([0] + torch.tensor(num_new).cumsum(0).tolist())
    query = torch.randn(sum(num_new), num_kv_heads * group, head_dim, device=DEVICE)
    args = (query, k_cache, v_cache, tables, qsl, int32(seq_lens), head_dim**-0.5)
    scales = make_scales() if fp8 else None
    out = paged_prefill_attention(*args, scales=scales)
    ref = paged_prefill_attention_ref(*args, scales)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    return args, out


@pytest.mark.parametrize(
    "block_size,num_kv_heads,group,head_dim",
    [(8, 2, 1, 64), (16, 1, 2, 128), (32, 1, 4, 64), (16, 1, 8, 64), (16, 3, 3, 64)],
)
def test_prefill_attention_matches_ref(block_size, num_kv_heads, group, head_dim):
    # fresh prompt, cached prefix + chunk, decode row, long chunk behind a partial block
    run_prefill([9, 6, 1, 21], [9, 30, 45, 40], block_size, num_kv_heads, group, head_dim)


@pytest.mark.parametrize("block_size,num_kv_heads,group,head_dim", [(8, 2, 1, 64), (16, 1, 4, 64)])
def test_prefill_attention_fp8_cache(block_size, num_kv_heads, group, head_dim):
    run_prefill([9, 6, 1, 21], [9, 30, 45, 40], block_size, num_kv_heads, group, head_dim,
                fp8=True)


def test_prefill_attention_many_sequences_strided_query():
    """17 sequences exercise the tile -> sequence binary search; query is a view of fused qkv."""
    num_new = torch.randint(1, 20, (17,)).tolist()
    seq_lens = [n + c for n, c in zip(num_new, torch.randint(0, 30, (17,)).tolist(), strict=True)]
    block_size, kv_heads, group, head_dim = 16, 1, 2, 64
    num_blocks = sum(-(-n // block_size) for n in seq_lens)
    k_cache, v_cache = make_cache(num_blocks, block_size, kv_heads, head_dim)
    tables = make_block_tables(seq_lens, block_size, num_blocks)
    qkv = torch.randn(sum(num_new), group + 2, head_dim, device=DEVICE)
    query = qkv[:, :group]  # (num_tokens, num_heads, head_dim), token stride (group + 2) * head_dim
    qsl = int32([0] + torch.tensor(num_new).cumsum(0).tolist())
    args = (query, k_cache, v_cache, tables, qsl, int32(seq_lens), 0.3)
    out = torch.empty_like(query)
    assert paged_prefill_attention(*args, out=out) is out
    torch.testing.assert_close(out, paged_prefill_attention_ref(*args), **TOL[torch.float32])


def test_prefill_decode_rows_match_decode_kernel():
    args, out = run_prefill([1, 1, 12, 1, 0], [1, 33, 12, 70, 5], 16, 2, 2, 64)
    query, k_cache, v_cache, tables, qsl, seq_lens, scale = args
    rows = [0, 1, 13, 14]  # the last new token of sequences 0..3
    decode = paged_decode_attention(query[rows], k_cache, v_cache, tables[:4], seq_lens[:4], scale)
    torch.testing.assert_close(out[rows], decode, **TOL[torch.float32])


def test_chunked_prefill_equals_dense_causal_attention():
    """write_kv + two prefill chunks reproduce one dense causal attention (the layout is right)."""
    block_size, kv_heads, group, head_dim, length, first = 8, 2, 2, 64, 29, 11
    k_cache, v_cache = make_cache(6, block_size, kv_heads, head_dim)
    tables = make_block_tables([length], block_size, 6)
    heads = (kv_heads * group, kv_heads, kv_heads)
    q, k, v = (torch.randn(length, h, head_dim, device=DEVICE) for h in heads)
    pos = torch.arange(length, device=DEVICE)
    slots = tables[0, pos // block_size].long() * block_size + pos % block_size
    write_kv(k, v, k_cache, v_cache, slots)
    outs = []
    for lo, hi in ((0, first), (first, length)):
        qsl, seq_lens = int32([0, hi - lo]), int32([hi])
        outs.append(paged_prefill_attention(q[lo:hi], k_cache, v_cache, tables, qsl, seq_lens,
                                            head_dim**-0.5))
    dense = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True
    ).transpose(0, 1)  # (length, num_heads, head_dim)
    torch.testing.assert_close(torch.cat(outs), dense, **TOL[torch.float32])


def test_prefill_attention_rejects_bad_input():
    k_cache, v_cache = make_cache(4, 8, 1, 64)
    query = torch.randn(5, 2, 64, device=DEVICE)
    tables = make_block_tables([5], 8, 4)
    with pytest.raises(ValueError, match="query_start_loc"):
        paged_prefill_attention(query, k_cache, v_cache, tables, int32([0]), int32([5]), 1.0)
    with pytest.raises(ValueError, match="seq_lens must be int32"):
        seq_lens = torch.tensor([5], device=DEVICE)
        paged_prefill_attention(query, k_cache, v_cache, tables, int32([0, 5]), seq_lens, 1.0)
    with pytest.raises(ValueError, match="query"):
        paged_prefill_attention(query[..., :32], k_cache, v_cache, tables, int32([0, 5]),
                                int32([5]), 1.0)
