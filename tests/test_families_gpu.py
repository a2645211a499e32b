"""The newer families on a CUDA GPU (Triton attention with windows and soft-capping, the fused
MoE kernel, decode CUDA graphs) against transformers on the same tiny random checkpoints, and the
fused MoE kernel at Qwen3-30B-A3B's shapes against its reference.

Marked `gpu`: conftest skips them without CUDA. No timing here (bench/moe.py does that).

    .venv/bin/pytest -q -p no:cacheprovider tests/test_families_gpu.py
"""

from __future__ import annotations

import pytest
import torch
from helpers import save_tiny_model
from test_gpu_engine import _free, _generate, _hf_greedy, _llm, _prompts

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("num_tokens", [1, 2, 8, 64, 300])
def test_fused_moe_at_qwen3_30b_a3b_shapes(num_tokens):
    from hearth.engine.models.moe import route
    from hearth.kernels.moe import fused_moe, fused_moe_ref

    gen = torch.Generator(device="cuda").manual_seed(num_tokens)
    h, inter, experts, top_k = 2048, 768, 128, 8
    x = torch.randn(num_tokens, h, device="cuda", generator=gen).bfloat16()
    w13 = (torch.randn(experts, 2 * inter, h, device="cuda", generator=gen) / h**0.5).bfloat16()
    w2 = (torch.randn(experts, h, inter, device="cuda", generator=gen) / inter**0.5).bfloat16()
    logits = torch.randn(num_tokens, experts, device="cuda", generator=gen)
    weights, ids = route(logits, top_k, True, torch.bfloat16)
    got = fused_moe(x, w13, w2, weights, ids).float()
    want = fused_moe_ref(x, w13, w2, weights, ids).float()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.parametrize("arch", ["qwen3moe", "mixtral"])
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_moe_greedy_float32_matches_transformers(tmp_path, arch, enforce_eager):
    from transformers import AutoModelForCausalLM

    path = save_tiny_model(tmp_path / arch, arch)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    prompts = _prompts((5, 17, 33, 64, 1, 130))
    llm = _llm(path, dtype="float32", enforce_eager=enforce_eager)
    assert _generate(llm, prompts, 24) == _hf_greedy(hf, prompts, 24)
    _free(llm, hf)


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gemma3", "phi3"])
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_window_families_greedy_float32_match_transformers(tmp_path, arch, enforce_eager):
    """Sliding windows (every layer: Mistral, Phi-3; interleaved: Gemma), soft-capping (Gemma 2),
    partial rotary and long-context RoPE (Phi) in the Triton kernels and CUDA graphs."""
    from transformers import AutoModelForCausalLM

    path = save_tiny_model(tmp_path / arch, arch)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    # Phi-3: 64 = original_max_position_embeddings, so generation crosses it (the sequence is
    # computed again with the long factors); 100 starts past it. Its reference recomputes the
    # whole sequence each step: transformers 5.17's generate (the GPU machine's) feeds only the
    # newest token, without a cache, once past the switch (5.25 matches the recompute:
    # tests/test_longrope_regime.py)
    prompts = _prompts((5, 17, 33, 64, 1, 130) + ((100,) if arch == "phi3" else ()))
    want = (_hf_greedy_recompute if arch == "phi3" else _hf_greedy)(hf, prompts, 24)
    llm = _llm(path, dtype="float32", enforce_eager=enforce_eager)
    assert _generate(llm, prompts, 24) == want
    chunked = _llm(path, dtype="float32", enforce_eager=enforce_eager, max_num_batched_tokens=19)
    assert _generate(chunked, prompts, 24) == want
    _free(llm, chunked, hf)


def _hf_greedy_recompute(model, prompts, max_new):
    """Greedy tokens from a full forward pass over the whole sequence at every step (no cache)."""
    outs = []
    for ids in prompts:
        seq = list(ids)
        with torch.no_grad():
            for _ in range(max_new):
                logits = model(torch.tensor([seq], device="cuda")).logits[0, -1]
                seq.append(int(logits.argmax()))
        outs.append(seq[len(ids):])
    return outs


@pytest.mark.parametrize("arch,rope", [
    ("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
               "rope_theta": 10000.0}),
    ("qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
               "rope_theta": 10000.0}),
])
def test_scaled_rope_greedy_float32_matches_transformers(tmp_path, arch, rope):
    from transformers import AutoModelForCausalLM

    path = save_tiny_model(tmp_path / arch, arch, rope_parameters=rope, head_dim=32)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    prompts = _prompts((5, 130))
    llm = _llm(path, dtype="float32")
    assert _generate(llm, prompts, 24) == _hf_greedy(hf, prompts, 24)
    _free(llm, hf)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3",
                                    "qwen3moe", "mixtral", "mistral"])
def test_converted_gguf_f16_greedy_matches_transformers(family):
    """tests/data/gguf (llama.cpp's converter) on the GPU: the F16 file's tokens equal
    transformers' on the HF directory it was converted from."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    data = Path(__file__).parent / "data" / "gguf"
    hf = AutoModelForCausalLM.from_pretrained(data / family, dtype=torch.float32).cuda().eval()
    vocab = hf.config.vocab_size
    prompts = [[3 + (i * 7919 + n) % (vocab - 3) for i in range(n)] for n in (5, 40)]
    name = "mistral-F16-SWA.gguf" if family == "mistral" else f"{family}-F16.gguf"
    llm = _llm(data / name, dtype="float32")
    assert _generate(llm, prompts, 16) == _hf_greedy(hf, prompts, 16)
    _free(llm, hf)
