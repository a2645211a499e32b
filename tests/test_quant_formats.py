"""Quantized formats: unpacking hand-built words whose values are known, config parsing, fused
loading into the quantized linears (every format and bit width)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hearth.engine.layers.linear import GGUFLinear, IntQuantLinear, make_linear
from hearth.engine.quantization import awq, compressed_tensors, gguf_blocks, gptq
from hearth.engine.quantization.config import (
    QuantConfig,
    UnsupportedQuantization,
    parse_quantization_config,
)
from hearth.engine.quantization.int_layout import AWQ_ORDER, pack, unpack


def _word(hex_value: int) -> torch.Tensor:
    """A uint32 bit pattern as the int32 a checkpoint stores."""
    return torch.tensor([[hex_value - (1 << 32) if hex_value >= 1 << 31 else hex_value]],
                        dtype=torch.int32)


# ------------------------------------------------------------------------------- int32 packing
def test_sequential_4bit_word():
    assert unpack(_word(0x87654321), 4, dim=1).tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert unpack(_word(0xF0000000), 4, dim=1).tolist() == [[0] * 7 + [15]]  # negative int32
    assert torch.equal(pack(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), 4, dim=1),
                       _word(0x87654321))


def test_awq_interleaved_word():
    # slots 0..7 hold elements 0, 2, 4, 6, 1, 3, 5, 7 of [1..8] -> nibbles 1 3 5 7 2 4 6 8
    assert unpack(_word(0x86427531), 4, dim=1, order=AWQ_ORDER).tolist() == [list(range(1, 9))]
    assert torch.equal(pack(torch.arange(1, 9)[None], 4, dim=1, order=AWQ_ORDER),
                       _word(0x86427531))


def test_8bit_word_and_dim0():
    assert unpack(_word(0x04030201), 8, dim=1).tolist() == [[1, 2, 3, 4]]
    assert unpack(_word(0x04030201), 8, dim=0).tolist() == [[1], [2], [3], [4]]


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack(torch.tensor([[16, 0, 0, 0, 0, 0, 0, 0]]), 4, dim=1)


# --------------------------------------------------------------------- formats, known values
def test_awq_dequantize_known_values():
    qweight = torch.cat([_word(0x86427531), _word(0)])  # (K=2, N/8=1): row 0 -> n+1, row 1 -> 0
    qzeros = _word(0x11111111)  # every zero point 1
    scales = torch.full((1, 8), 0.5, dtype=torch.float16)
    w = awq.dequantize(qweight, qzeros, scales, group_size=2)  # (N=8, K=2)
    assert w[:, 0].tolist() == [0.5 * n for n in range(8)]
    assert w[:, 1].tolist() == [-0.5] * 8


@pytest.mark.parametrize("v2, zero", [(False, 3), (True, 2)])
def test_gptq_4bit_known_values(v2, zero):
    qweight = _word(0x87654321).expand(1, 8).contiguous()  # every column: q[k] = k + 1
    qzeros = _word(0x22222222)  # stored 2: v1 means zero 3, v2 means zero 2
    scales = torch.full((1, 8), 0.25, dtype=torch.float16)
    g_idx = torch.zeros(8, dtype=torch.int32)
    w = gptq.dequantize(qweight, qzeros, scales, g_idx, bits=4, v2=v2)  # (8, 8)
    assert w[3].tolist() == [(k + 1 - zero) * 0.25 for k in range(8)]


def test_gptq_v1_zero_minus_one_wraps():
    # AutoGPTQ stores zero - 1 modulo 16: a stored 15 is a zero point of 0
    qzeros = _word(0xFFFFFFFF)
    w = gptq.dequantize(_word(0x87654321).expand(1, 8).contiguous(), qzeros,
                        torch.ones(1, 8), torch.zeros(8, dtype=torch.int32))
    assert w[0].tolist() == [float(k + 1) for k in range(8)]


def test_gptq_8bit_known_values():
    qweight = _word(0x04030201).expand(1, 4).contiguous()  # K=4, N=4
    qzeros = _word(0x05050505)  # v1: zero 6
    w = gptq.dequantize(qweight, qzeros, torch.ones(1, 4), torch.zeros(4, dtype=torch.int32),
                        bits=8)
    assert w[0].tolist() == [-5.0, -4.0, -3.0, -2.0]


def test_compressed_tensors_symmetric_known_values():
    packed = torch.cat([_word(0x87654321), _word(0x88888888)])  # (N=2, K/8=1)
    scale = torch.tensor([[2.0], [3.0]])
    w = compressed_tensors.dequantize(packed, scale, bits=4, group_size=8)
    assert w[0].tolist() == [2.0 * (v - 8) for v in range(1, 9)]  # stored q + 8
    assert w[1].tolist() == [0.0] * 8


def test_compressed_tensors_asymmetric_zero_points():
    packed = _word(0x87654321).expand(8, 1).contiguous()  # N=8 rows of [1..8]
    zero_point = _word(0x76543210)  # packed along N: row n has zero n
    w = compressed_tensors.dequantize(packed, torch.ones(8, 1), 4, zero_point, group_size=8)
    assert w[5].tolist() == [float(v - 5) for v in range(1, 9)]


def _fp16_bytes(value: float) -> list[int]:
    return list(np.array([value], dtype=np.float16).view(np.uint8))


def test_gguf_q4_0_q4_1_q8_0_known_values():
    nibbles = [j | ((15 - j) << 4) for j in range(16)]  # elements 0..15 = j, 16..31 = 15 - j
    q = list(range(16)) + list(range(15, -1, -1))
    q4_0 = torch.tensor([_fp16_bytes(0.5) + nibbles], dtype=torch.uint8)
    assert gguf_blocks.dequantize(q4_0, "Q4_0", 32)[0].tolist() == [(v - 8) * 0.5 for v in q]
    q4_1 = torch.tensor([_fp16_bytes(0.5) + _fp16_bytes(-1.0) + nibbles], dtype=torch.uint8)
    assert gguf_blocks.dequantize(q4_1, "Q4_1", 32)[0].tolist() == [v * 0.5 - 1 for v in q]
    ints = list(range(-16, 16))
    q8_0 = torch.tensor([_fp16_bytes(0.25) + [v & 0xFF for v in ints]], dtype=torch.uint8)
    assert gguf_blocks.dequantize(q8_0, "Q8_0", 32)[0].tolist() == [v * 0.25 for v in ints]


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K"])
def test_gguf_matches_gguf_py(qtype):
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(0)
    block, size = gguf_blocks.BLOCKS[qtype]
    raw = rng.integers(0, 256, (4, 512 // block * size), dtype=np.uint8)
    for offset in range(0, raw.shape[1], size):  # sane float16 scales (no inf / nan)
        d_at = offset + (size - 2 if qtype == "Q6_K" else 0)
        raw[:, d_at : d_at + 2] = np.array([0.01], dtype=np.float16).view(np.uint8)
    want = quants.dequantize(raw, GGMLQuantizationType[qtype])
    got = gguf_blocks.dequantize(torch.from_numpy(raw), qtype, 512).numpy()
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------- config parsing
def test_parse_configs():
    assert parse_quantization_config({}, "x") is None
    a = parse_quantization_config({"quantization_config": {
        "quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True,
        "version": "gemm"}}, "x")
    assert (a.method, a.group_size, a.sym) == ("awq", 64, False)
    g = parse_quantization_config({"quantization_config": {
        "quant_method": "gptq", "bits": 8, "group_size": -1, "desc_act": True, "sym": False}}, "x")
    assert (g.bits, g.group_size, g.desc_act, g.sym, g.gptq_v2) == (8, None, True, False, False)
    c = parse_quantization_config({"quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
            "group_size": 64}}}}}, "x")
    assert (c.method, c.group_size, c.sym, c.ignore) == ("compressed-tensors", 64, True,
                                                         ("lm_head",))


@pytest.mark.parametrize("qc, match", [
    ({"quant_method": "awq", "version": "gemv"}, "gemm"),
    ({"quant_method": "bitsandbytes"}, "not supported"),
    ({"quant_method": "gptq", "bits": 3}, "use 4 or 8"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized"}, "pack-quantized"),
])
def test_parse_rejects_unsupported(qc, match):
    with pytest.raises(UnsupportedQuantization, match=match):
        parse_quantization_config({"quantization_config": qc}, "config.json")


def test_group_size_must_divide_inputs():
    with pytest.raises(UnsupportedQuantization, match="64 or 32"):
        IntQuantLinear(576, 64, False, QuantConfig("gptq", group_size=128))


def test_ignored_modules_stay_float():
    quant = QuantConfig("compressed-tensors", ignore=("re:.*down_proj",))
    assert isinstance(make_linear(64, 64, False, quant, ("model.layers.0.mlp.down_proj",)),
                      torch.nn.Linear)


# ------------------------------------------------------------------------ fused loading (N-dim)
SHARDS = (("q_proj", 32), ("k_proj", 16), ("v_proj", 16))  # a fused q/k/v of 64 outputs, K=64


def _random_shard(n: int, k: int, group: int, bits: int, gen):
    q = torch.randint(0, 1 << bits, (n, k), generator=gen)
    zeros = torch.randint(0, 1 << bits, (n, k // group), generator=gen)
    scales = (torch.rand(n, k // group, generator=gen) * 0.1 + 0.01).half().float()
    return q, zeros, scales


def _load_fused(quant: QuantConfig, shard_tensors) -> IntQuantLinear:
    layer = IntQuantLinear(64, 64, False, quant)
    offset = 0
    for (_name, n), tensors in zip(SHARDS, shard_tensors, strict=True):
        for key, t in tensors.items():
            layer.load(key, t, (offset, n))
        offset += n
    layer.finalize()
    return layer


@pytest.mark.parametrize("method, bits", [("awq", 4), ("gptq", 4), ("gptq", 8),
                                          ("compressed-tensors", 4), ("compressed-tensors", 8)])
def test_fused_load_equals_concatenated_reference(method, bits):
    gen = torch.Generator().manual_seed(0)
    group = 16
    sym = method == "compressed-tensors"
    quant = QuantConfig(method, bits, group, sym=sym)
    shard_tensors, refs = [], []
    for _, n in SHARDS:
        q, zeros, scales = _random_shard(n, 64, group, bits, gen)
        if method == "awq":
            t = awq.quantized_to_checkpoint(q, zeros, scales, bits)
            ref = awq.dequantize(t["qweight"], t["qzeros"], t["scales"], group, bits)
        elif method == "gptq":
            g_idx = torch.arange(64, dtype=torch.int32) // group
            t = gptq.quantized_to_checkpoint(q, zeros, scales, g_idx, bits)
            ref = gptq.dequantize(t["qweight"], t["qzeros"], t["scales"], g_idx, bits)
        else:
            t = compressed_tensors.quantized_to_checkpoint(q, scales, bits)
            ref = compressed_tensors.dequantize(t["weight_packed"], t["weight_scale"], bits,
                                                group_size=group)
        shard_tensors.append(t)
        refs.append(ref)
    layer = _load_fused(quant, shard_tensors)
    assert torch.equal(layer.dequantized_weight(), torch.cat(refs))
    x = torch.randn(3, 64)
    want = x @ torch.cat(refs).t()
    # float32 sums in another order: ulp-level differences, relative to the output's scale
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_gptq_act_order_g_idx_and_mismatch():
    gen = torch.Generator().manual_seed(1)
    g_idx = (torch.randperm(64, generator=gen) // 16).to(torch.int32)  # any group per channel
    quant = QuantConfig("gptq", 4, 16, sym=False, desc_act=True)
    shard_tensors, refs = [], []
    for _, n in SHARDS:
        q, zeros, scales = _random_shard(n, 64, 16, 4, gen)
        t = gptq.quantized_to_checkpoint(q, zeros, scales, g_idx)
        shard_tensors.append(t)
        refs.append(gptq.dequantize(t["qweight"], t["qzeros"], t["scales"], g_idx))
    assert torch.equal(_load_fused(quant, shard_tensors).dequantized_weight(), torch.cat(refs))
    shard_tensors[2] = dict(shard_tensors[2], g_idx=g_idx.flip(0))
    with pytest.raises(UnsupportedQuantization, match="different g_idx"):
        _load_fused(quant, shard_tensors)


def test_missing_shard_is_an_error():
    gen = torch.Generator().manual_seed(2)
    q, zeros, scales = _random_shard(32, 64, 16, 4, gen)
    layer = IntQuantLinear(64, 64, False, QuantConfig("awq", 4, 16, sym=False))
    for key, t in awq.quantized_to_checkpoint(q, zeros, scales).items():
        layer.load(key, t, (0, 32))
    with pytest.raises(ValueError, match="missing quantized tensor"):
        layer.finalize()


def test_gguf_fused_rows():
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(3)
    layer = GGUFLinear(64, 64, False, "Q4_1")
    raws, offset = [], 0
    for _, n in SHARDS:
        raw = quants.quantize(rng.standard_normal((n, 64)).astype(np.float32),
                              GGMLQuantizationType.Q4_1)
        layer.load("qweight", torch.from_numpy(raw), (offset, n))
        raws.append(quants.dequantize(raw, GGMLQuantizationType.Q4_1))
        offset += n
    layer.finalize()
    np.testing.assert_array_equal(layer.dequantized_weight().numpy(), np.concatenate(raws))


@pytest.mark.parametrize("qtype", sorted(gguf_blocks.BLOCKS))
def test_gguf_dummy_weights_are_finite_and_small(qtype):
    """load_format="dummy" (benchmarks): every block's scales are set, wherever the type keeps
    them (Q6_K's d is at the end of its block), so no weight is inf or NaN."""
    layer = GGUFLinear(256, 32, False, qtype)
    layer.init_dummy(torch.Generator().manual_seed(0))
    w = gguf_blocks.dequantize(layer.qweight, qtype, 256)
    assert torch.isfinite(w).all() and w.abs().max() < 10


@pytest.mark.parametrize("qtype", sorted(gguf_blocks.BLOCKS))
def test_gguf_to_int_layout_is_exact(qtype):
    """CUDA runs every GGUF type on the int kernels: the repacked weight equals the blocks'
    (K-quants: random blocks with finite scales, as gguf-py cannot quantize them)."""
    from hearth.engine.quantization.int_layout import default_g_idx, dequantize_int_layout

    rng = np.random.default_rng(5)
    block, size = gguf_blocks.BLOCKS[qtype]
    raw = torch.from_numpy(rng.integers(0, 256, (24, 512 // block * size), dtype=np.uint8))
    for at in gguf_blocks.SCALE_BYTES[qtype]:
        d = rng.uniform(1e-4, 1e-2, (24, 512 // block)).astype(np.float16)
        raw.view(24, -1, size)[..., at:at + 2] = torch.from_numpy(d.view(np.uint8).reshape(
            24, -1, 2))
    qweight, zeros, scales, bits, group, offset = gguf_blocks.to_int_layout(raw, qtype, 512)
    assert qweight.shape == (512 * bits // 32, 24) and zeros.shape == scales.shape == (
        512 // group, 24)
    assert offset == (qtype in ("Q4_1", "Q4_K"))
    got = dequantize_int_layout(qweight, zeros, scales, default_g_idx(512, group), bits,
                                offset).t()
    torch.testing.assert_close(got, gguf_blocks.dequantize(raw, qtype, 512), rtol=0, atol=0)
    with pytest.raises(ValueError, match="has no int layout"):
        gguf_blocks.to_int_layout(raw, "Q5_K", 512)
