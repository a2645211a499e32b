"""The tensor-core decode kernel over fragment words (kernels/quant/int4_tc.py) against the int
layout's torch reference, on fresh random inputs: under TRITON_INTERPRET=1 on CPU (the mma
emulated with tensor ops from the same words, so packing, k order, group sums and split-K are
covered), and on CUDA with the inline-PTX mma (`gpu` marker), up to full Llama-3-8B shapes and
through the layers."""

from __future__ import annotations

import pytest
import torch

from hearth.engine.quantization import gguf_blocks
from hearth.engine.quantization.int_layout import default_g_idx, dequantize_int_layout, pack, unpack
from hearth.kernels.quant import int4_tc
from hearth.kernels.quant.int4_frag import frag_dequantize, frag_pack, frag_unpack
from hearth.kernels.quant.int4_tc import TcBlocks, frag_matmul, layout_supported
from hearth.kernels.quant.int4_tc import int4_tc as tc_matmul
from hearth.kernels.quant.quant_gemm import dequantized_matmul_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CPU_DTYPE = torch.float16  # the interpreter's bf16 is not the GPU's; fp16 is exact enough


def _weights(k: int, n: int, group: int, offset: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=gen)
    if offset:
        zeros = (torch.randn(k // group, n, generator=gen) * 0.01).half()
    else:
        zeros = torch.randint(0, 16, (k // group, n), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(k // group, n, generator=gen) * 0.01 + 0.001).half()
    return [t.to(DEVICE) for t in (pack(q, 4, dim=0), zeros, scales)]


def _reference(x, qweight, zeros, scales, group, offset):
    """The format's dequantization, then the kernels' reference matmul (fp32)."""
    g_idx = default_g_idx(x.shape[1], group, x.device)
    w_t = dequantize_int_layout(qweight, zeros, scales, g_idx, 4, offset)  # (K, N)
    return dequantized_matmul_ref(x.float(), w_t.t())


def _frag(qweight):
    """Int-layout words (K // 8, N) → fragment words, as a layer packs them at load."""
    return frag_pack(unpack(qweight, 4, dim=0))


def _rel(out, ref) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def test_frag_pack_places_each_nibble_in_its_mma_fragment():
    """Lane l = 4g + t of tile (nt, kt) holds A[row][slot] of mma.m16n8k16 in register
    r = 2 (slot // 8) + row // 8, half e = slot % 2, at nibble r + 4e; slot 2t + e + 8 k8 of
    tile 2p + h is input 32p + 8t + 4h + 2 k8 + e."""
    k, n = 128, 32
    q = torch.arange(k * n).reshape(k, n) % 16
    words = frag_pack(q)
    assert words.shape == (n // 16, k // 64, 32, 4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        nt, kt, lane = (int(torch.randint(0, s, (1,), generator=gen)) for s in (2, 8, 32))
        g, t = lane // 4, lane % 4
        p, h = kt // 2, kt % 2
        word = int(words[nt, kt // 4, lane, kt % 4]) & 0xFFFFFFFF
        for r in range(4):
            for e in range(2):
                row = nt * 16 + g + 8 * (r % 2)
                inp = 32 * p + 8 * t + 4 * h + 2 * (r // 2) + e
                assert (word >> (4 * (r + 4 * e))) & 0xF == q[inp, row]
    assert torch.equal(frag_unpack(words), q.to(torch.int32))
    assert torch.equal(_frag(pack(q, 4, dim=0)), words)  # from the int layout's words
    with pytest.raises(ValueError, match="4-bit values"):
        frag_pack(q + 1)


def test_layout_supported():
    assert layout_supported(4, 128, 4096, 4096, torch.bfloat16)
    assert layout_supported(4, 32, 1536, 576, torch.float16)  # the default model's shapes
    assert not layout_supported(4, 128, 4096, 4096, torch.float32)  # fp32 models: int layout
    assert not layout_supported(8, 128, 4096, 4096, torch.bfloat16)
    assert not layout_supported(4, None, 4096, 4096, torch.bfloat16)  # act-order
    assert not layout_supported(4, 16, 4096, 4096, torch.bfloat16)
    assert not layout_supported(4, 96, 4096, 576, torch.bfloat16)  # a step would cut a group
    assert layout_supported(4, 4096, 1024, 4096, torch.bfloat16)  # per-channel


def test_layout_needs_ampere_or_later(monkeypatch):
    """mma.m16n8k16 with bf16 / fp16 needs compute capability 8.0: a Turing or Volta GPU keeps
    the int layout (its GEMV runs there)."""
    cuda = torch.device("cuda")
    for capability, expected in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, c=capability: c)
        assert layout_supported(4, 128, 4096, 4096, torch.float16, cuda) is expected
    assert not layout_supported(4, 128, 4104, 4096, torch.bfloat16)  # N not in whole tiles
    assert not layout_supported(4, 64, 4096, 4032 + 32, torch.bfloat16)  # K % 64


@pytest.mark.parametrize("m, k, n, group, split_k, offset", [
    (1, 128, 32, 32, 1, False), (3, 256, 48, 32, 2, False), (8, 256, 64, 64, 2, True),
    (9, 256, 64, 64, 2, False), (16, 256, 160, 128, 1, True), (5, 192, 32, 64, 3, True),
    (2, 576, 64, 32, 2, True), (7, 448, 48, 64, 3, False), (1, 256, 32, 256, 1, False),
    (12, 512, 32, 256, 2, False), (1, 1024, 32, 128, 3, False),
    (2, 1024, 32, 1024, 3, False), (11, 576, 48, 192, 4, True), (1, 640, 32, 640, 5, False)])
def test_int4_tc_matches_reference(m, k, n, group, split_k, offset):
    qweight, zeros, scales = _weights(k, n, group, offset, seed=m + k + n)
    x = torch.randn(m, k, device=DEVICE, dtype=CPU_DTYPE)
    out = tc_matmul(x, _frag(qweight), zeros, scales, group, split_k=split_k, offset=offset)
    assert out.dtype == x.dtype and out.shape == (m, n)
    assert _rel(out, _reference(x, qweight, zeros, scales, group, offset)) < 2e-3


def test_int4_tc_split_reduction_is_deterministic_and_resets_counters():
    qweight, zeros, scales = _weights(512, 160, 128, False, seed=3)
    words = _frag(qweight)
    x = torch.randn(2, 512, device=DEVICE, dtype=CPU_DTYPE)
    counters = torch.zeros(160, dtype=torch.int32, device=DEVICE)
    blocks = TcBlocks(n_tiles=4, num_warps=4, waves=2)
    outs = [tc_matmul(x, words, zeros, scales, 128, split_k=3, counters=counters, blocks=blocks)
            for _ in range(2)]
    assert torch.equal(outs[0], outs[1])
    assert not counters.any()
    with pytest.raises(ValueError, match="counters must be"):
        tc_matmul(x, words, zeros, scales, 128, split_k=3, counters=counters[:1], blocks=blocks)
    with pytest.raises(ValueError, match="M <= 16"):
        tc_matmul(torch.randn(17, 512, dtype=CPU_DTYPE, device=DEVICE), words, zeros, scales, 128)
    with pytest.raises(ValueError, match="fragments"):
        tc_matmul(x, words[:, :1], zeros, scales, 128)


@pytest.mark.parametrize("group, offset", [(32, False), (64, True), (128, False)])
def test_frag_dequantize_is_exact_and_frag_matmul_routes_by_rows(group, offset):
    k, n = 256, 80
    qweight, zeros, scales = _weights(k, n, group, offset, seed=group)
    words = _frag(qweight)
    ref_w = dequantize_int_layout(qweight, zeros, scales, default_g_idx(k, group, DEVICE), 4,
                                  offset).t()
    for direct in (False, True):  # one permute a tile, or each lane's 16-byte runs
        w = frag_dequantize(words, zeros, scales, group, torch.empty(n * k, device=DEVICE),
                            offset, direct=direct)
        assert torch.equal(w, ref_w)
    for m in (4, 20, 40, 70):  # int4_tc (by 16 rows), int_mma (groups of 64k), the copy
        x = torch.randn(m, k, device=DEVICE, dtype=CPU_DTYPE)
        out = frag_matmul(x, words, zeros, scales, group, offset=offset)
        assert _rel(out, _reference(x, qweight, zeros, scales, group, offset)) < 2e-3


def test_pdl_off_on_cpu_and_when_disabled(monkeypatch):
    """Kernels launch plainly (constexpr 0, no launch_pdl) on CPU / in the interpreter and with
    kernels.pdl.ENABLED off (HEARTH_PDL=0); the trigger points are the measured defaults."""
    from hearth.kernels import pdl

    assert pdl.mode(torch.device("cpu")) == 0 and pdl.launch_kwargs(torch.device("cpu")) == {}
    monkeypatch.setattr(pdl, "ENABLED", False)
    cuda = torch.device("cuda", 0)
    assert pdl.mode(cuda) == 0 and pdl.mode(cuda, small=True) == 0
    assert pdl.launch_kwargs(cuda) == {} and not pdl.active(cuda)
    assert (pdl.TRIGGER, pdl.TRIGGER_SMALL) == (2, 1)
    monkeypatch.setattr(pdl, "ENABLED", True)
    monkeypatch.setattr(pdl, "gdc_wait", None)  # a Triton before 3.3
    assert not pdl.hopper(cuda) and pdl.mode(cuda) == 0


# --------------------------------------------------------------------------------------- CUDA
LLAMA3_8B_LINEARS = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672),
                     "down": (14336, 4096)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("linear", sorted(LLAMA3_8B_LINEARS))
def test_int4_tc_full_shapes_gpu(linear, m, dtype):
    k, n = LLAMA3_8B_LINEARS[linear]
    qweight, zeros, scales = _weights(k, n, 128, False, seed=m)
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    counters = torch.zeros(n, dtype=torch.int32, device=DEVICE)
    out = tc_matmul(x, _frag(qweight), zeros, scales, 128, counters=counters)
    assert _rel(out, _reference(x, qweight, zeros, scales, 128, False)) < 5e-3
    assert not counters.any()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m, group, offset", [(1, 32, True), (5, 32, False), (16, 64, True),
                                              (300, 128, False)])
def test_frag_matmul_gpu(m, group, offset, dtype):
    k, n = 1536, 576
    qweight, zeros, scales = _weights(k, n, group, offset, seed=m)
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    out = frag_matmul(x, _frag(qweight), zeros, scales, group, offset=offset)
    assert _rel(out, _reference(x, qweight, zeros, scales, group, offset)) < 5e-3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layers_convert_to_fragments_on_cuda(dtype):
    """Built in a 16-bit model, 4-bit AWQ/GPTQ-style and GGUF Q4 layers keep fragment words
    (qweight dropped); their outputs match the float weights at every M; an 8-bit layer and a
    float32 model keep the int layout."""
    from hearth.engine.layers.linear import GGUFLinear, IntQuantLinear
    from hearth.engine.quantization.config import QuantConfig

    k, n = 4096, 1024
    qweight, zeros, scales = _weights(k, n, 128, False, seed=7)
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        layer = IntQuantLinear(k, n, False, QuantConfig(method="gptq", bits=4, group_size=128))
        layer = layer.to(DEVICE)
        layer.qweight.copy_(qweight), layer.zeros.copy_(zeros), layer.scales.copy_(scales)
        layer._filled.update(qweight=n, zeros=n, scales=n)
        layer.finalize()
        raw = torch.randint(0, 256, (n, gguf_blocks.row_bytes("Q4_K", k)), dtype=torch.uint8)
        raw.view(n, -1, gguf_blocks.BLOCKS["Q4_K"][1])[..., :4] = torch.tensor(
            [0, 0x14, 0, 0x10], dtype=torch.uint8)  # d, dmin: small float16s
        gguf = GGUFLinear(k, n, False, "Q4_K").to(DEVICE)
        gguf.load("qweight", raw, None)
        gguf.finalize()
    finally:
        torch.set_default_dtype(previous)
    assert layer.frag is not None and layer.qweight.numel() == 0
    assert gguf.frag is not None and gguf.int_layout[0].numel() == 0
    ref_w = dequantize_int_layout(qweight, zeros, scales, default_g_idx(k, 128, DEVICE), 4).t()
    assert torch.equal(layer.dequantized_weight(), ref_w)
    gguf_w = gguf_blocks.dequantize(raw.to(DEVICE), "Q4_K", k)
    torch.testing.assert_close(gguf.dequantized_weight(), gguf_w)
    for m in (1, 4, 16, 64):
        x = torch.randn(m, k, device=DEVICE, dtype=dtype)
        assert _rel(layer(x), x.float() @ ref_w.t()) < 5e-3
        assert _rel(gguf(x), x.float() @ gguf_w.t()) < 5e-3
    fp32 = IntQuantLinear(k, n, False, QuantConfig(method="gptq", bits=4, group_size=128))
    fp32 = fp32.to(DEVICE)
    fp32.qweight.copy_(qweight), fp32.zeros.copy_(zeros), fp32.scales.copy_(scales.float())
    fp32._filled.update(qweight=n, zeros=n, scales=n)
    fp32.finalize()
    assert fp32.frag is None and fp32.qweight.numel() == qweight.numel()
    assert int4_tc.ENABLED


@pytest.mark.gpu
def test_pdl_chain_in_cuda_graph_reads_fresh_inputs():
    """rms_norm -> int4_tc -> silu_and_mul -> int4_tc captured in one CUDA graph, launched with
    programmatic dependent launch on Hopper (kernels/pdl.py): each replay, on new inputs, gives
    the reference result, so no kernel read its input before the previous one had written it."""
    from hearth.kernels import pdl
    from hearth.kernels.fused import rms_norm, silu_and_mul

    if not pdl.active(torch.device(DEVICE)):
        pytest.skip("PDL needs compute capability 9.0+")
    k, i = 1024, 2048
    up_w = _weights(k, 2 * i, 128, False, seed=1)
    down_w = _weights(i, k, 128, False, seed=2)
    up_f, down_f = _frag(up_w[0]), _frag(down_w[0])
    norm_w = torch.rand(k, device=DEVICE, dtype=torch.bfloat16) + 0.5
    h = torch.empty(1, k, device=DEVICE, dtype=torch.bfloat16)

    def chain():
        x = rms_norm(h, norm_w, 1e-5)
        return tc_matmul(silu_and_mul(tc_matmul(x, up_f, *up_w[1:], 128)), down_f, *down_w[1:],
                         128)

    h.normal_()
    chain()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain()
    for seed in range(5):
        h.copy_(torch.randn(1, k, generator=torch.Generator().manual_seed(seed)).to(h))
        graph.replay()
        x = rms_norm(h, norm_w, 1e-5)
        a = silu_and_mul(_reference(x, *up_w, 128, False).to(torch.bfloat16))
        assert _rel(out, _reference(a, *down_w, 128, False)) < 1e-2
