"""GGUF Q4_0/Q4_1 weights through torch's CPU int4 GEMV (engine/quantization/cpu_int4.py): the
packed layout reads back exactly, the matmul matches the block reference, and the default model in
bf16 runs its linears from the packed weights with the dequantized path's next-token
distribution."""

from __future__ import annotations

import pytest
import torch
from helpers import random_q4_blocks

from hearth import LLM, SamplingParams
from hearth.engine.layers.linear import GGUFLinear
from hearth.engine.quantization import cpu_int4, gguf_blocks


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("n,k", [(64, 32), (192, 96), (320, 576)])
def test_pack_reads_back_the_blocks(qtype, n, k):
    gen = torch.Generator().manual_seed(n * 7 + k)
    raw = random_q4_blocks(qtype, n, k, gen)
    w = cpu_int4.pack_gguf(raw, qtype, k, torch.bfloat16)
    blocks = raw.view(n, k // 32, -1)
    nibbles = gguf_blocks.nibbles(blocks[..., -16:].reshape(-1, 16), 16).reshape(n, k)
    assert torch.equal(cpu_int4.unpack(w), nibbles)  # torch's packed layout, read back exactly
    ref = gguf_blocks.dequantize(raw, qtype, k)
    # scale and zero are held in bf16: 8 significant bits, far below a 4-bit step
    step = ref.abs().max() / 8
    assert (cpu_int4.dequantize(w).float() - ref).abs().max() < step / 8


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("m", [1, 3, 16, 40])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matmul_matches_block_reference(qtype, m, dtype):
    gen = torch.Generator().manual_seed(m)
    n, k = 192, 288
    raw = random_q4_blocks(qtype, n, k, gen)
    w = cpu_int4.pack_gguf(raw, qtype, k, dtype)
    x = torch.randn(m, k, generator=gen)
    ref = x @ gguf_blocks.dequantize(raw, qtype, k).t()
    out = cpu_int4.linear(x.to(dtype), w)  # GEMV for m <= 32, dequantize + matmul above
    assert out.dtype == dtype and out.shape == (m, n)
    assert (out.float() - ref).abs().max() < 0.02 * ref.abs().max()


@pytest.mark.parametrize("native_bf16", [True, False])
def test_prompt_rows_multiply_in_float32_without_bf16_matrix_instructions(monkeypatch,
                                                                          native_bf16):
    """Many rows dequantize the layer; without AVX512-BF16 / AMX the product runs in float32
    (an emulated bf16 GEMM is ~7x slower there), with them in bf16. A few rows stay on the GEMV."""
    monkeypatch.setattr(cpu_int4, "cpu_has_bf16_matmul", lambda: native_bf16)
    gen = torch.Generator().manual_seed(5)
    n, k = 192, 288
    w = cpu_int4.pack_gguf(random_q4_blocks("Q4_1", n, k, gen), "Q4_1", k, torch.bfloat16)
    x = torch.randn(40, k, generator=gen).to(torch.bfloat16)
    if native_bf16:
        want = torch.nn.functional.linear(x, cpu_int4.dequantize(w))
    else:
        want = (x.float() @ cpu_int4.dequantize(w, torch.float32).t()).to(torch.bfloat16)
    out = cpu_int4.linear(x, w)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want)
    assert torch.equal(cpu_int4.linear(x[:2], w), cpu_int4.matmul(x[:2], w))


@pytest.mark.parametrize("m", [1, 5, 40])
def test_float32_rows_on_a_bf16_packed_weight(m):
    """EngineConfig.cpu_bf16_gemv: a float32 model's few rows take the GEMV rounded to bf16 and
    come back in float32; many rows multiply the float32 dequantized layer."""
    gen = torch.Generator().manual_seed(m)
    n, k = 192, 288
    raw = random_q4_blocks("Q4_1", n, k, gen)
    w = cpu_int4.pack_gguf(raw, "Q4_1", k, torch.bfloat16)
    x = torch.randn(m, k, generator=gen)
    out = cpu_int4.linear(x, w)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    if m <= 32:
        assert torch.equal(out, cpu_int4.matmul(x.bfloat16(), w).float())
    else:
        assert torch.equal(out, x @ cpu_int4.dequantize(w, torch.float32).t())
    ref = x @ gguf_blocks.dequantize(raw, "Q4_1", k).t()
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()


def test_unsupported_shapes_and_dtypes_are_refused():
    assert not cpu_int4.supported("Q4_1", 96, 64, torch.bfloat16)  # rows not a multiple of 64
    assert not cpu_int4.supported("Q4_1", 128, 64, torch.float32)  # float32 stays exact
    assert not cpu_int4.supported("Q8_0", 128, 64, torch.bfloat16)
    raw = torch.zeros(96, gguf_blocks.row_bytes("Q4_1", 64), dtype=torch.uint8)
    with pytest.raises(ValueError, match="rows a multiple of 64"):
        cpu_int4.pack_gguf(raw, "Q4_1", 64, torch.bfloat16)
    w = cpu_int4.pack_gguf(torch.zeros(64, 40, dtype=torch.uint8), "Q4_1", 64, torch.bfloat16)
    with pytest.raises(ValueError, match="must be"):
        cpu_int4.matmul(torch.zeros(1, 64), w)  # float32 activations for a bf16 weight


def test_default_model_bf16_runs_its_linears_in_int4():
    prompt = "The capital of France is"
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
    top = {}
    for keep in (False, True):
        llm = LLM(device="cpu", dtype="bfloat16", progress=False, gguf_keep_quantized=keep)
        try:
            layers = [m for m in llm.engine.runner.model.modules() if isinstance(m, GGUFLinear)]
            if keep:
                assert len(layers) == 30 * 4
                assert all(m.int4 is not None and m.qweight.numel() == 0 for m in layers)
            out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
            first = out.logprobs[0]
            top[keep] = dict(zip(first.top_token_ids, first.top_logprobs))
        finally:
            llm.shutdown()
    dense, packed = top[False], top[True]
    assert max(dense, key=dense.get) == max(packed, key=packed.get)  # the same next token
    common = set(dense) & set(packed)
    assert len(common) >= 4
    assert max(abs(dense[t] - packed[t]) for t in common) < 0.15


def _int_layout(n: int, k: int, group: int, gen: torch.Generator):
    from hearth.engine.quantization.int_layout import pack

    q = torch.randint(0, 16, (k, n), generator=gen)
    zeros = torch.randint(0, 16, (k // group, n), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(k // group, n, generator=gen) * 0.02 + 0.001).half()
    return q, pack(q, 4, dim=0), zeros, scales


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 5, 40])
def test_int_layout_packs_and_multiplies(group, m):
    """AWQ / GPTQ int layout: (q - z) s as (q - 8) s + (8 - z) s, the nibbles read back
    exactly, and the GEMV (m <= 32) and the dequantized matmul match the reference."""
    from hearth.engine.quantization.int_layout import default_g_idx, dequantize_int_layout

    gen = torch.Generator().manual_seed(group + m)
    n, k = 192, 256
    q, qweight, zeros, scales = _int_layout(n, k, group, gen)
    w = cpu_int4.pack_int(qweight, zeros, scales, group, torch.bfloat16)
    assert torch.equal(cpu_int4.unpack(w), q.t().to(torch.uint8))
    ref_w = dequantize_int_layout(qweight, zeros, scales, default_g_idx(k, group), 4).t()
    x = torch.randn(m, k, generator=gen)
    ref = x @ ref_w.t()
    out = cpu_int4.linear(x.bfloat16(), w)
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() < 0.02 * ref.abs().max()


def test_int_layout_refusals():
    assert not cpu_int4.supported_int(8, 64, 128, 64, torch.bfloat16)  # 8 bits
    assert not cpu_int4.supported_int(4, None, 128, 64, torch.bfloat16)  # act-order
    assert not cpu_int4.supported_int(4, 16, 128, 64, torch.bfloat16)  # group torch lacks
    assert not cpu_int4.supported_int(4, 32, 128, 64, torch.float32)  # float32 stays exact
    _, qweight, zeros, scales = _int_layout(96, 64, 32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="rows a multiple of 64"):
        cpu_int4.pack_int(qweight, zeros, scales, 32, torch.bfloat16)


@pytest.mark.parametrize("layout", ["halves-64", "halves-32", "pairs-32"])
def test_every_known_torch_layout_reads_back(layout):
    """torch packs per CPU (AVX-512: tiles of 64, AVX2: 32): each reading inverts its packing,
    whichever machine the tests run on, and this machine's layout is one of them."""
    n, k = 128, 64
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    tile = 64 if layout == "halves-64" else 32
    t = q.view(n // tile, tile, k)
    if layout.startswith("halves"):
        lo, hi = t[:, : tile // 2], t[:, tile // 2:]  # rows j and tile/2 + j
    else:
        lo, hi = t[:, 0::2], t[:, 1::2]  # rows 2j and 2j + 1
    packed = (lo | (hi << 4)).permute(0, 2, 1).contiguous().view(n, k // 2)
    assert torch.equal(cpu_int4._LAYOUTS[layout](packed, n, k), q)
    assert cpu_int4._layout() in cpu_int4._LAYOUTS
