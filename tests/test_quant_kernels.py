"""Dequant GEMM kernels (kernels/quant/) vs their torch reference, on fresh random inputs: under
TRITON_INTERPRET=1 at small shapes on CPU, on CUDA at full shapes (`gpu` marker)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import hearth.kernels.quant.int_mma as mma
from hearth.engine.quantization import gguf_blocks
from hearth.engine.quantization.int_layout import default_g_idx, dequantize_int_layout, pack
from hearth.kernels.quant.gguf_gemm import GGUF_KERNEL_TYPES, gguf_matmul
from hearth.kernels.quant.int_gemv import GemvBlocks, int_gemv
from hearth.kernels.quant.quant_gemm import dequantized_matmul_ref, int_quant_matmul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (2e-4, 2e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (5e-2, 5e-2)}


# The kernels' reference: the format dequantizes (engine/quantization), the reference multiplies.
def _int_ref(x, qweight, zeros, scales, g_idx, bits: int):
    w_t = dequantize_int_layout(qweight, zeros, scales, g_idx, bits)  # (K, N)
    return dequantized_matmul_ref(x, w_t.t())


def _gguf_ref(x, raw, qtype: str):
    return dequantized_matmul_ref(x, gguf_blocks.dequantize(raw, qtype, x.shape[1]))


def _int_weights(k: int, n: int, bits: int, group: int | None, act_order: bool, seed: int,
                 sym: bool = False):
    gen = torch.Generator().manual_seed(seed)
    groups = k // (group or k)
    q = torch.randint(0, 1 << bits, (k, n), generator=gen)
    zeros = torch.randint(0, 1 << bits, (groups, n), generator=gen, dtype=torch.int32)
    if sym:
        zeros.fill_(1 << (bits - 1))
    scales = torch.rand(groups, n, generator=gen) * 0.02 + 0.001
    g_idx = default_g_idx(k, group)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)].contiguous()
    return [t.to(DEVICE) for t in (pack(q, bits, dim=0), zeros.to(torch.uint8),
                                   scales.half(), g_idx)]


@pytest.mark.parametrize("bits, group, act_order", [(4, 32, False), (4, 64, True), (8, 32, False),
                                                    (4, None, False)])
@pytest.mark.parametrize("m, split_k", [(1, 1), (3, 2), (20, 1)])
def test_int_kernel_matches_reference(bits, group, act_order, m, split_k):
    k, n = 256, 96  # n not a multiple of BLOCK_N: exercises the masks
    qweight, zeros, scales, g_idx = _int_weights(k, n, bits, group, act_order, seed=m + bits)
    x = torch.randn(m, k, device=DEVICE)
    out = int_quant_matmul(x, qweight, zeros, scales, g_idx, bits,
                           None if act_order else group, split_k=split_k)
    ref = _int_ref(x, qweight, zeros, scales, g_idx, bits)
    torch.testing.assert_close(out, ref, rtol=2e-4, atol=2e-4)


def test_int_kernel_half_precision():
    qweight, zeros, scales, g_idx = _int_weights(128, 64, 4, 32, False, seed=7)
    x = torch.randn(2, 128, device=DEVICE).half()
    out = int_quant_matmul(x, qweight, zeros, scales, g_idx, 4, 32)
    assert out.dtype == torch.float16
    ref = _int_ref(x.float(), qweight, zeros, scales, g_idx, 4)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


# Decode GEMV (kernels/quant/int_gemv.py): fp32 accumulation of exact weights, so the reference is
# the fp32 product of the same (dtype-rounded) x; the output's rounding to x's dtype sets the
# tolerance.
GEMV_TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _check_gemv(out, x, weights, bits: int) -> None:
    ref = _int_ref(x.float(), *weights, bits)
    assert out.dtype == x.dtype and out.shape == ref.shape
    tol = GEMV_TOL[x.dtype]
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol * ref.abs().mean().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("m, k, n, split_k", [(1, 256, 96, 2), (3, 384, 200, 3), (16, 256, 80, 1)])
def test_int_gemv_matches_reference(dtype, group, m, k, n, split_k):
    """int_quant_matmul sends M <= 16 to the GEMV; N is no multiple of the block (masks), splits
    do not divide K evenly; symmetric zeros for group 64, random ones otherwise."""
    weights = _int_weights(k, n, 4, group, False, seed=m * group + k, sym=group == 64)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    out = int_quant_matmul(x, *weights, 4, group, split_k=split_k)
    _check_gemv(out, x, weights, 4)


@pytest.mark.parametrize("m, group", [(1, 32), (5, 128)])
def test_int_gemv_8bit(m, group):
    weights = _int_weights(256, 72, 8, group, False, seed=m)
    x = torch.randn(m, 256, device=DEVICE)
    _check_gemv(int_quant_matmul(x, *weights, 8, group, split_k=2), x, weights, 8)


def test_int_gemv_split_reduction_is_deterministic_and_resets_counters():
    """Several N tiles and splits: the last split of each tile sums the partials in split order,
    so two calls agree bit for bit, and every counter is back at zero for the next call."""
    weights = _int_weights(512, 160, 4, 128, False, seed=3)
    qweight, zeros, scales, _ = weights
    x = torch.randn(2, 512, device=DEVICE)
    counters = torch.zeros(160, dtype=torch.int32, device=DEVICE)
    blocks = GemvBlocks(block_n=64, block_k=64, num_warps=2, waves=2)
    outs = [int_gemv(x, qweight, zeros, scales, 4, 128, split_k=5, counters=counters,
                     blocks=blocks) for _ in range(2)]
    assert torch.equal(outs[0], outs[1])
    assert not counters.any()
    _check_gemv(outs[0], x, weights, 4)
    with pytest.raises(ValueError, match="counters must be"):
        int_gemv(x, qweight, zeros, scales, 4, 128, split_k=5, counters=counters[:2],
                 blocks=blocks)


# M > 16 with 16-bit x: int_mma (W dequantized in registers) and int_dequant_matmul (W written in
# x's dtype, then F.linear). Both round each weight to x's dtype, as the reference does; the
# comparison is against the fp32 product of the same rounded x and weights.
def _check_rounded(out, x, weights, bits: int, tol: float | None = None) -> None:
    w = dequantize_int_layout(*weights, bits).t().to(x.dtype).float()  # (N, K)
    ref = torch.nn.functional.linear(x.float(), w)
    assert out.dtype == x.dtype and out.shape == ref.shape
    tol = tol or GEMV_TOL[x.dtype]
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol * ref.abs().mean().item())


MMA_CASES = [(17, 256, 96, 32), (33, 384, 200, 64), (64, 256, 80, 128), (130, 256, 136, 128)]


@pytest.mark.parametrize("f32_dequant", [True, False])
@pytest.mark.parametrize("m, k, n, group", MMA_CASES)
def test_int_mma_matches_reference(m, k, n, group, f32_dequant):
    """fp16 x (the interpreter miscomputes bf16 tl.dot: bf16 is in the gpu tests) through the
    table's blocks for M, both dequant modes; N no multiple of the block (masks), symmetric zeros
    for group 64, random ones otherwise; M = 33 and 130 also split K (in-kernel reduction)."""
    weights = _int_weights(k, n, 4, group, False, seed=m + k + n, sym=group == 64)
    x = torch.randn(m, k, device=DEVICE).half()
    blocks = replace(mma.mma_blocks(m), f32_dequant=f32_dequant)
    split_k = 3 if m in (33, 130) else 1
    counters = torch.zeros(n, dtype=torch.int32, device=DEVICE)
    out = mma.int_mma(x, *weights, 4, group, blocks=blocks, split_k=split_k, counters=counters)
    _check_rounded(out, x, weights, 4)
    assert not counters.any()


@pytest.mark.parametrize("bits, group, act_order", [(4, 128, True), (8, 32, False)])
def test_int_mma_and_dequant_act_order_and_8bit(bits, group, act_order):
    """Act-order gathers zeros and scales per input through g_idx; 8 bits packs 4 per word."""
    weights = _int_weights(256, 72, bits, group, act_order, seed=bits)
    x = torch.randn(40, 256, device=DEVICE).half()
    group_size = None if act_order else group
    _check_rounded(mma.int_mma(x, *weights, bits, group_size), x, weights, bits)
    _check_rounded(mma.int_dequant_matmul(x, *weights, bits, group_size), x, weights, bits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits, group, act_order, sym", [
    (4, 32, False, False), (4, 64, False, True), (4, 128, False, False), (4, 64, True, False),
    (8, 128, False, False)])
def test_int_dequant_matmul_matches_reference(bits, group, act_order, sym, dtype, monkeypatch):
    """Where GEMM_BLOCKS says None, int_quant_matmul goes through the bf16/fp16 copy of W and
    F.linear. The interpreter truncates fp32 -> bf16 (up to one ulp off round-to-nearest per
    weight): emulated in torch over 30 seeds of x at this shape, outputs move by up to 4.8% of
    mean |out| (2e-2 failed now and then with an unseeded x): 6e-2, x seeded."""
    monkeypatch.setattr(mma, "GEMM_BLOCKS", ((32, mma.mma_blocks(32)), (64, None)))
    weights = _int_weights(384, 200, bits, group, act_order, seed=group + bits, sym=sym)
    gen = torch.Generator().manual_seed(bits * group)
    x = torch.randn(33, 384, generator=gen).to(DEVICE, dtype)
    out = int_quant_matmul(x, *weights, bits, None if act_order else group)
    _check_rounded(out, x, weights, bits, tol=6e-2 if dtype == torch.bfloat16 else None)


@pytest.mark.parametrize("path, m, dtype", [
    ("gemv", 1, torch.float16), ("gemv", 1, torch.float32), ("gemv", 5, torch.float16),
    ("mma", 20, torch.float16), ("dequant", 20, torch.float16), ("gemm", 20, torch.float32)])
def test_int_kernels_offset_mode(path, m, dtype):
    """GGUF Q4_1 / Q4_K repacked into the int layout hold w = q s + b, the float offsets b in
    `zeros` (offset=True): every path against the reference (fp32 scales and offsets, as the
    K-quants; 8 packed rows per step so that M = 5 stays on the GEMV)."""
    k, n, group = 256, 96, 64
    gen = torch.Generator().manual_seed(m)
    qweight = pack(torch.randint(0, 16, (k, n), generator=gen), 4, dim=0).to(DEVICE)
    scales = (torch.rand(k // group, n, generator=gen) * 0.01 + 0.001).to(DEVICE)
    offsets = (torch.randn(k // group, n, generator=gen) * 0.01).to(DEVICE)
    g_idx = default_g_idx(k, group, DEVICE)
    weights = (qweight, offsets, scales, g_idx)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    if path == "gemv":
        out = int_gemv(x, qweight, offsets, scales, 4, group, split_k=2, offset=True)
    elif path == "mma":
        out = mma.int_mma(x, *weights, 4, group, offset=True)
    elif path == "dequant":
        out = mma.int_dequant_matmul(x, *weights, 4, group, offset=True)
    else:
        out = int_quant_matmul(x, *weights, 4, group, offset=True)  # fp32 x: _int_gemm_kernel
    w = dequantize_int_layout(*weights, 4, offset=True).t()
    if path in ("mma", "dequant"):  # W rounded to x's dtype, as in _check_rounded
        w = w.to(dtype).float()
    ref = x.float() @ w.t()
    assert out.dtype == dtype
    assert ((out.float() - ref).norm() / ref.norm()).item() < (2e-3 if dtype != torch.float32
                                                              else 1e-5)


def test_dequant_scratch_is_reused_and_never_freed():
    """One buffer per (device, dtype) for every layer; an outgrown one is kept alive, since a
    captured CUDA graph may still write to it; a reservation sizes the first allocation."""
    scratch = mma._Scratch()
    scratch.reserved = 300
    device = torch.device(DEVICE)
    a = scratch.get(100, device, torch.float16)
    assert a.numel() == 100 and scratch.buffers[(device, torch.float16)].numel() == 300
    b = scratch.get(300, device, torch.float16)
    assert b.data_ptr() == a.data_ptr() and not scratch.retired
    c = scratch.get(400, device, torch.float16)
    assert c.data_ptr() != a.data_ptr() and scratch.retired[0].data_ptr() == a.data_ptr()
    assert scratch.get(50, device, torch.bfloat16).dtype == torch.bfloat16


def _gguf_weights(qtype: str, n: int, k: int, seed: int) -> torch.Tensor:
    """(n, k) weights in qtype's blocks: gguf-py quantizes standard normals for the 32-weight
    types; it cannot quantize K-quants, so those are random bytes with each block's float16 d
    (and dmin) set to a random finite scale that keeps |w| within a few units."""
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(seed)
    if qtype not in ("Q4_K", "Q6_K"):
        w = rng.standard_normal((n, k)).astype(np.float32)
        return torch.from_numpy(quants.quantize(w, GGMLQuantizationType[qtype])).to(DEVICE)
    block, size = gguf_blocks.BLOCKS[qtype]
    raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    for at in gguf_blocks.SCALE_BYTES[qtype]:
        d = rng.uniform(2e-4, 1e-3, (n, k // block, 1)).astype(np.float16)
        raw[..., at : at + 2] = d.view(np.uint8)
    return torch.from_numpy(raw.reshape(n, -1)).to(DEVICE)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("m, split_k", [(1, 4), (20, 1)])
def test_gguf_kernel_matches_reference(qtype, m, split_k):
    """K = 512: two K-quant blocks per row. M = 1 (BLOCK_K 128) splits K in four, so splits
    start and end inside a K-quant block; M = 20 (BLOCK_K 64); N is no multiple of BLOCK_N."""
    k, n = 512, 80
    qweight = _gguf_weights(qtype, n, k, seed=m)
    x = torch.randn(m, k, device=DEVICE)
    out = gguf_matmul(x, qweight, qtype, split_k=split_k)
    torch.testing.assert_close(out, _gguf_ref(x, qweight, qtype), rtol=2e-4, atol=2e-4)


def _q4_k_block(d: float, dmin: float, sc: list[int], mn: list[int], q: list[int]) -> list[int]:
    """One Q4_K block built by hand: 8 six-bit scales and mins, 256 nibbles (llama.cpp layout)."""
    scales = [sc[i] | (sc[4 + i] >> 4) << 6 for i in range(4)]
    scales += [mn[i] | (mn[4 + i] >> 4) << 6 for i in range(4)]
    scales += [(sc[4 + i] & 15) | (mn[4 + i] & 15) << 4 for i in range(4)]
    qs = [q[64 * g + i] | q[64 * g + 32 + i] << 4 for g in range(4) for i in range(32)]
    return _fp16_bytes(d) + _fp16_bytes(dmin) + scales + qs


def _q6_k_block(d: float, sc: list[int], q: list[int]) -> list[int]:
    """One Q6_K block built by hand: 256 six-bit quants, 16 int8 scales."""
    ql = [q[128 * h + i] & 15 | (q[128 * h + 64 + i] & 15) << 4 for h in range(2)
          for i in range(64)]
    qh = [sum((q[128 * h + 32 * p + i] >> 4) << 2 * p for p in range(4)) for h in range(2)
          for i in range(32)]
    return ql + qh + [v & 0xFF for v in sc] + _fp16_bytes(d)


def _fp16_bytes(value: float) -> list[int]:
    return list(np.array([value], dtype=np.float16).view(np.uint8))


def test_gguf_k_quants_known_values():
    """Hand-built blocks, two rows each (scales >= 16 use the packed high bits; Q6_K scales and d
    negative too), through the torch reference and, as the weight of an identity x, through the
    kernel (BLOCK_K 32): both give exactly d * sc * q - dmin * mn, and d * sc * (q - 32)."""
    rng = np.random.default_rng(0)
    q4, q6 = rng.integers(0, 16, 256).tolist(), rng.integers(0, 64, 256).tolist()
    sc4, mn4 = [1, 2, 63, 5, 17, 33, 48, 60], [0, 7, 40, 63, 1, 20, 50, 32]
    sc6 = [-128, -3, 0, 1, 2, 7, 16, 31, 33, 64, 100, 127, -1, -17, -64, 5]
    cases = {
        "Q4_K": [(_q4_k_block(d, dmin, sc, mn, q4),
                  [d * sc[j // 32] * q4[j] - dmin * mn[j // 32] for j in range(256)])
                 for d, dmin, sc, mn in [(0.5, 0.25, sc4, mn4), (1.0, 0.5, sc4[::-1], mn4[::-1])]],
        "Q6_K": [(_q6_k_block(d, sc, q6), [d * sc[j // 16] * (q6[j] - 32) for j in range(256)])
                 for d, sc in [(0.25, sc6), (-2.0, sc6[::-1])]],
    }
    eye = torch.eye(256, device=DEVICE)
    for qtype, rows in cases.items():
        raw = torch.tensor([r[0] for r in rows], dtype=torch.uint8, device=DEVICE)  # (2, bytes)
        want = torch.tensor([r[1] for r in rows], device=DEVICE)  # (2, 256)
        assert torch.equal(gguf_blocks.dequantize(raw, qtype, 256), want)
        torch.testing.assert_close(gguf_matmul(eye, raw, qtype).t(), want, rtol=0, atol=0)


def test_launcher_checks():
    qweight, zeros, scales, g_idx = _int_weights(64, 32, 4, 32, False, seed=0)
    x = torch.randn(2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="qweight must be"):
        int_quant_matmul(torch.randn(2, 128, device=DEVICE), qweight, zeros, scales, g_idx, 4, 32)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        int_quant_matmul(x, qweight, zeros, scales, g_idx, 3, 32)
    with pytest.raises(ValueError, match="zeros and scales"):
        int_quant_matmul(x, qweight, zeros[:, :16], scales, g_idx, 4, 32)
    with pytest.raises(ValueError, match="x must be 2-D"):
        int_quant_matmul(x[None], qweight, zeros, scales, g_idx, 4, 32)
    raw = _gguf_weights("Q4_1", 8, 64, seed=0)
    with pytest.raises(ValueError, match="no kernel for GGUF type Q5_K"):
        gguf_matmul(x, raw, "Q5_K")
    with pytest.raises(ValueError, match=r"Q4_0 weight for K=64 must be \(N, 36\)"):
        gguf_matmul(x, raw, "Q4_0")
    for qtype in ("Q4_K", "Q6_K"):  # 256 weights per block
        with pytest.raises(ValueError, match=f"{qtype} packs 256 .* multiple of 256, got K=64"):
            gguf_matmul(x, raw, qtype)
    with pytest.raises(ValueError, match=r"Q4_K weight for K=256 must be \(N, 144\)"):
        gguf_matmul(torch.randn(2, 256, device=DEVICE), _gguf_weights("Q6_K", 8, 256, 0), "Q4_K")
    assert set(GGUF_KERNEL_TYPES) == set(gguf_blocks.BLOCKS)  # every type it can hold


def test_gguf_kernel_geometry_is_the_formats():
    """The kernel declares the blocks it decodes; they are the format module's blocks."""
    for qtype, kind in GGUF_KERNEL_TYPES.items():
        assert (kind.block_weights, kind.block_bytes) == gguf_blocks.BLOCKS[qtype], qtype
    assert len({kind.qtype for kind in GGUF_KERNEL_TYPES.values()}) == len(GGUF_KERNEL_TYPES)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 16, 256])
def test_full_shapes_gpu(dtype, m):
    """Llama-3-8B qkv 4096 -> 6144 (int4, group 128)."""
    qweight, zeros, scales, g_idx = _int_weights(4096, 6144, 4, 128, False, seed=0)
    x = torch.randn(m, 4096, device=DEVICE, dtype=dtype)
    out = int_quant_matmul(x, qweight, zeros, scales, g_idx, 4, 128)
    ref = _int_ref(x, qweight, zeros, scales, g_idx, 4)
    torch.testing.assert_close(out, ref, rtol=TOL[dtype][0], atol=TOL[dtype][1] * 10)


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 16, 256])
def test_gguf_full_shapes_gpu(dtype, m, qtype):
    """Llama-3-8B down 14336 -> 4096 in GGUF blocks (the default split-K at M <= 16)."""
    raw = _gguf_weights(qtype, 4096, 14336, seed=1)
    x = torch.randn(m, 14336, device=DEVICE, dtype=dtype)
    torch.testing.assert_close(gguf_matmul(x, raw, qtype), _gguf_ref(x, raw, qtype),
                               rtol=TOL[dtype][0], atol=TOL[dtype][1] * 10)


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", sorted(gguf_blocks.BLOCKS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 4, 64, 256])
def test_gguf_linear_cuda_matches_blocks(qtype, dtype, m):
    """GGUFLinear on CUDA: every type repacked into the int layout (GEMV, int_mma, dequantized
    copy by M), against the blocks dequantized in float32."""
    from hearth.engine.layers.linear import GGUFLinear

    raw = _gguf_weights(qtype, 1024, 4096, seed=2)
    layer = GGUFLinear(4096, 1024, False, qtype).to(DEVICE)
    layer.load("qweight", raw, None)
    layer.finalize()
    assert layer.int_layout is not None
    x = torch.randn(m, 4096, device=DEVICE, dtype=dtype)
    ref = x.float() @ gguf_blocks.dequantize(raw, qtype, 4096).t()
    out = layer(x).float()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2


LLAMA3_8B_LINEARS = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672),
                     "down": (14336, 4096)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m, group", [(1, 128), (4, 128), (16, 128), (4, 32), (16, 32)])
@pytest.mark.parametrize("linear", sorted(LLAMA3_8B_LINEARS))
def test_int_gemv_full_shapes_gpu(linear, m, group, dtype):
    """Llama-3-8B linears, AWQ-style int4 (group 128; group 32 as GGUF, whose 4-row steps the
    M > 1 path pads to 8) through the default split-K: fp32-exact up to the output's rounding,
    deterministic, counters left at zero."""
    k, n = LLAMA3_8B_LINEARS[linear]
    weights = _int_weights(k, n, 4, group, False, seed=k + n + m)
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    counters = torch.zeros(n, dtype=torch.int32, device=DEVICE)
    out = int_gemv(x, *weights[:3], 4, group, counters=counters)
    _check_gemv(out, x, weights, 4)
    assert torch.equal(out, int_gemv(x, *weights[:3], 4, group, counters=counters))
    assert not counters.any()


@pytest.mark.gpu
@pytest.mark.parametrize("f32_dequant", [True, False])
@pytest.mark.parametrize("m, k, n, group", MMA_CASES)
def test_int_mma_bf16_gpu(m, k, n, group, f32_dequant):
    """The CPU cases in bf16 (compiled, wgmma where the blocks allow). Dequantizing in bf16 (not
    the default) rounds the fp16 scale to bf16 first: 2 roundings per weight. Emulated in torch on
    20 seeds at (130, 256, 136), that alone moves outputs by up to 4.6% of mean |out|: 6e-2."""
    weights = _int_weights(k, n, 4, group, False, seed=m + k + n, sym=group == 64)
    gen = torch.Generator().manual_seed(m * k)
    x = torch.randn(m, k, generator=gen).to(DEVICE, torch.bfloat16)
    blocks = replace(mma.mma_blocks(m), f32_dequant=f32_dequant)
    out = mma.int_mma(x, *weights, 4, group, blocks=blocks, split_k=3 if m in (33, 130) else 1)
    _check_rounded(out, x, weights, 4, tol=None if f32_dequant else 6e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [32, 128, 256])
@pytest.mark.parametrize("linear", sorted(LLAMA3_8B_LINEARS))
def test_int_quant_matmul_large_m_full_shapes_gpu(linear, m):
    """Llama-3-8B linears, int4 group 128, bf16, through the default path for M (the blocks table,
    split-K, or the dequantized copy and cuBLAS), and through the dequantized copy explicitly."""
    k, n = LLAMA3_8B_LINEARS[linear]
    weights = _int_weights(k, n, 4, 128, False, seed=k + n + m)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    counters = torch.zeros(n, dtype=torch.int32, device=DEVICE)
    blocks = mma.gemm_blocks(m)
    tol = None if blocks is None or blocks.f32_dequant else 2e-2
    out = int_quant_matmul(x, *weights, 4, 128, counters=counters)
    _check_rounded(out, x, weights, 4, tol)
    assert not counters.any()
    _check_rounded(mma.int_dequant_matmul(x, *weights, 4, 128), x, weights, 4)


@pytest.mark.gpu
def test_int_mma_fp16_full_shape_gpu():
    weights = _int_weights(14336, 4096, 4, 128, False, seed=5)
    x = torch.randn(128, 14336, device=DEVICE, dtype=torch.float16)
    _check_rounded(mma.int_mma(x, *weights, 4, 128), x, weights, 4)
