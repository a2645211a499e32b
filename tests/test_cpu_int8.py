"""The CPU's int8 LM head (engine/quantization/cpu_int8.py): per-row absmax rounding, torch's
int8 GEMV against a float reference on fresh random inputs, and when the model uses it."""

from __future__ import annotations

import pytest
import torch

from hearth.engine.quantization import cpu_int8


def test_rows_round_within_half_a_step_and_keep_their_extremes():
    w = torch.randn(300, 96, generator=torch.Generator().manual_seed(1)) * 0.05
    q = cpu_int8.quantize_rows(w.bfloat16())
    assert q.weight.dtype == torch.int8 and q.scales.shape == (300,)
    assert int(q.weight.abs().max()) == 127
    step = q.scales.float()[:, None]
    # the scale itself is rounded to bf16: allow that on top of half a step
    assert ((cpu_int8.dequantize(q) - w.bfloat16().float()).abs() <= 0.5 * step + 0.01 * w.abs()
            + 1e-6).all()


def test_chunks_give_the_whole_matrix_rounding_and_leave_the_weight_alone():
    w = torch.randn(1000, 64, generator=torch.Generator().manual_seed(2))
    before = w.clone()
    whole, chunked = cpu_int8.quantize_rows(w, chunk_rows=1000), cpu_int8.quantize_rows(w, 7)
    assert torch.equal(w, before)  # float32 input: no in-place pass on the caller's tensor
    assert torch.equal(whole.weight, chunked.weight) and torch.equal(whole.scales, chunked.scales)
    ref = torch.round(w / (w.abs().amax(1, keepdim=True) / 127)).clamp(-127, 127)
    assert torch.equal(whole.weight.float(), ref)


def test_zero_rows_stay_zero():
    q = cpu_int8.quantize_rows(torch.zeros(4, 32, dtype=torch.bfloat16))
    assert torch.equal(cpu_int8.dequantize(q), torch.zeros(4, 32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 4])
def test_matmul_matches_the_dequantized_product(dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    w = (torch.randn(1000, 128, generator=gen) * 0.02).to(dtype)
    x = torch.randn(rows, 128, generator=gen).to(dtype)
    q = cpu_int8.quantize_rows(w)
    out = cpu_int8.matmul(x, q)
    ref = x.float() @ cpu_int8.dequantize(q).T
    assert out.shape == (rows, 1000) and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_logits_refine_the_top_of_each_row_in_float32():
    """The kernel's bf16 logits round a near-tie to a tie; `logits` recomputes each row's top
    REFINED from the int8 rows and float32 scales, and leaves the rest as the kernel gave them."""
    gen = torch.Generator().manual_seed(3)
    q = cpu_int8.quantize_rows(torch.randn(4000, 96, generator=gen) * 0.05, dtype=torch.bfloat16)
    for x in (torch.randn(3, 96, generator=gen).bfloat16(), torch.randn(2, 96, generator=gen)):
        coarse = cpu_int8.matmul(x, q).float()
        out = cpu_int8.logits(x, q)
        assert out.dtype == torch.float32 and out.shape == coarse.shape
        exact = x.float() @ cpu_int8.dequantize_exact(q).T
        top = coarse.topk(cpu_int8.REFINED, dim=1).indices
        torch.testing.assert_close(out.gather(1, top), exact.gather(1, top), atol=1e-5,
                                   rtol=1e-5)
        rest = torch.ones_like(out, dtype=torch.bool).scatter_(1, top, False)
        assert torch.equal(out[rest], coarse[rest])
        # bf16 output rounds logits of this size to steps of 2^-7..2^-6; float32 resolves ties
        assert (out.gather(1, top).diff(dim=1) != 0).all()


def test_float32_activations_go_through_the_16_bit_kernel():
    """EngineConfig.cpu_bf16_gemv: scales in bf16, a float32 row rounded to bf16 on the way in."""
    gen = torch.Generator().manual_seed(4)
    q = cpu_int8.quantize_rows(torch.randn(512, 64, generator=gen), dtype=torch.bfloat16)
    assert q.scales.dtype == torch.bfloat16 and q.exact_scales.dtype == torch.float32
    x = torch.randn(2, 64, generator=gen)
    out = cpu_int8.matmul(x, q)
    assert out.dtype == torch.float32
    assert torch.equal(out, cpu_int8.matmul(x.bfloat16(), q).float())


def test_only_narrow_gguf_heads_and_16_bit_activations():
    assert cpu_int8.supported("Q8_0", torch.bfloat16)
    assert cpu_int8.supported("Q6_K", torch.float16)
    assert not cpu_int8.supported("F16", torch.bfloat16)  # int8 would round the file's head
    assert not cpu_int8.supported("Q8_0", torch.float32)  # the exact path stays exact
    assert not cpu_int8.supported(None, torch.bfloat16)


def test_the_model_uses_it_for_decode_batches_only(monkeypatch):
    from hearth.engine.catalog import resolve_model
    from hearth.engine.config import EngineConfig
    from hearth.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(device="cpu", dtype="bfloat16", gguf_keep_quantized=True,
                                    kv_cache_gib=0.02, max_model_len=256), progress=False)
    try:
        model = engine.runner.model
        assert model.lm_head_int8 is not None, resolve_model(None).path
        calls = []
        real = cpu_int8.matmul
        monkeypatch.setattr(cpu_int8, "matmul", lambda x, w: calls.append(len(x)) or real(x, w))
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(40, model.config.hidden_size, generator=gen).to(torch.bfloat16)
        few, many = model.compute_logits(hidden[:1]), model.compute_logits(hidden)
        assert calls == [1] and few.shape == (1, model.config.vocab_size)
        # a decode batch's rows get the logits they would get alone (batch invariance)
        torch.testing.assert_close(model.compute_logits(hidden[:cpu_int8.MAX_ROWS])[:1], few,
                                   atol=0, rtol=0)
        # the int8 row agrees with the 16-bit head's on the same input: its top token is the
        # 16-bit head's or a near-tie of it (a random hidden state has near-ties; CI drew one)
        exact = many[0].float()
        assert exact[int(few.argmax())] >= exact.max() - 0.25
        torch.testing.assert_close(few.float(), many[:1].float(), atol=0.5, rtol=0.05)
    finally:
        engine.shutdown()
