"""The small fused Triton kernels (kernels/fused.py: RMSNorm, rotary, SiLU-and-mul) against their
torch references, on fresh random inputs; in Triton's interpreter on a machine without CUDA."""

import pytest
import torch
import torch.nn.functional as F

from hearth.kernels.fused import (
    qk_rms_norm_,
    qk_rms_norm_ref,
    rms_norm,
    rms_norm_ref,
    rotary_embedding,
    rotary_embedding_ref,
    silu_and_mul,
    silu_and_mul_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: {"atol": 2e-5, "rtol": 1e-4}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def int32(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_ref(dtype, with_residual):
    x = torch.randn(5, 576, dtype=dtype, device=DEVICE)
    weight = torch.randn(576, device=DEVICE)
    residual = torch.randn_like(x) if with_residual else None
    out = rms_norm(x, weight, 1e-5, residual)
    ref = rms_norm_ref(x, weight, 1e-5, residual)
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 6])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 64), (16, 8, 128)])
def test_qk_rms_norm_in_place_matches_ref_and_the_separate_norms(
    dtype, num_tokens, heads, kv_heads, head_dim
):
    """Qwen3's per-head q/k norms in one launch on the projection's output (a tile of all the
    token's heads, padded to a power of two): the reference's values, rms_norm's on each head's
    row to the last bit or so (a tile's row sums in another order on a GPU), and v and nothing
    else touched."""
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=DEVICE)
    qw, kw = torch.randn(head_dim, device=DEVICE), torch.randn(head_dim, device=DEVICE)
    out, ref = qkv.clone(), qkv.clone()
    qk_rms_norm_(out, heads, kv_heads, head_dim, qw, kw, 1e-6)
    qk_rms_norm_ref(ref, heads, kv_heads, head_dim, qw, kw, 1e-6)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    q_end, k_end = heads * head_dim, (heads + kv_heads) * head_dim
    separate_q = rms_norm(qkv[:, :q_end].reshape(-1, head_dim), qw, 1e-6)
    separate_k = rms_norm(qkv[:, q_end:k_end].reshape(-1, head_dim), kw, 1e-6)
    ulp = {torch.float32: {"atol": 1e-6, "rtol": 1e-6}, torch.bfloat16: {"atol": 0, "rtol": 8e-3}}
    torch.testing.assert_close(out[:, :q_end].reshape(-1, head_dim), separate_q, **ulp[dtype])
    torch.testing.assert_close(out[:, q_end:k_end].reshape(-1, head_dim), separate_k, **ulp[dtype])
    assert torch.equal(out[:, k_end:], qkv[:, k_end:])


def test_qk_rms_norm_rejects_bad_input():
    qkv = torch.randn(3, 8 * 64, device=DEVICE)
    w = torch.ones(64, device=DEVICE)
    with pytest.raises(ValueError, match="qkv must be"):
        qk_rms_norm_(qkv[:, :100], 4, 2, 64, w, w, 1e-6)
    with pytest.raises(ValueError, match="k_weight"):
        qk_rms_norm_(qkv, 4, 2, 64, w, torch.ones(32, device=DEVICE), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rotary_embedding_in_place_on_qkv_views(dtype, head_dim):
    num_tokens, heads, kv_heads = 7, 4, 2
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=DEVICE)
    expected = qkv.clone()
    cos_sin = torch.randn(100, head_dim, device=DEVICE)
    positions = torch.randint(0, 100, (num_tokens,), device=DEVICE)
    sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    q, k, _ = qkv.split(sizes, dim=-1)  # (num_tokens, heads * head_dim) strided views
    rotary_embedding(positions, q, k, cos_sin, head_dim)
    q_ref, k_ref, _ = expected.split(sizes, dim=-1)
    rotary_embedding_ref(positions, q_ref, k_ref, cos_sin, head_dim)
    torch.testing.assert_close(qkv, expected, **TOL[dtype])  # V untouched, Q/K rotated


def test_rotary_matches_hf_rotate_half():
    head_dim, positions = 64, int32([0, 3, 17])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=DEVICE).float() / head_dim))
    freqs = torch.outer(torch.arange(32, device=DEVICE).float(), inv_freq)  # (32, head_dim // 2)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    q, k = torch.randn(3, 2, head_dim, device=DEVICE), torch.randn(3, 1, head_dim, device=DEVICE)
    emb = torch.cat([freqs, freqs], dim=-1)[positions][:, None, :]  # (3, 1, head_dim)
    half = head_dim // 2
    expected = q * emb.cos() + torch.cat([-q[..., half:], q[..., :half]], -1) * emb.sin()
    rotary_embedding(positions, q, k, cos_sin, head_dim)
    torch.testing.assert_close(q, expected, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_matches_ref(dtype):
    x = torch.randn(3, 2 * 1536, dtype=dtype, device=DEVICE)  # d = 1536 spans two column blocks
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), **TOL[dtype])
    gate, up = x.float().chunk(2, dim=-1)
    torch.testing.assert_close(silu_and_mul(x).float(), F.silu(gate) * up, **TOL[dtype])


def test_fused_reject_bad_input():
    x = torch.randn(4, 64, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.randn(32, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, torch.randn(64, device=DEVICE), 1e-5, residual=x.half())
    with pytest.raises(ValueError, match="2 \\* d"):
        silu_and_mul(torch.randn(4, 63, device=DEVICE))
    with pytest.raises(ValueError, match="cos_sin_cache"):
        rotary_embedding(torch.arange(4, device=DEVICE), x, x, torch.randn(8, 32), 64)
    with pytest.raises(ValueError, match="positions"):
        rotary_embedding(torch.zeros(4, device=DEVICE), x, x, torch.randn(8, 64), 64)
