"""Gemma 2, Gemma 3 (text), Phi-3 / Phi-4-mini, Qwen3-MoE and Mixtral from HF directories: greedy
tokens equal transformers' on tiny random models (float32, CPU), alone, batched and chunked; the
test models slide an 8-token window over local layers, soft-cap (Gemma 2), rotate part of each
head with long-context RoPE factors (Phi), route each token to 2 of 8 experts (MoE)."""

from __future__ import annotations

import pytest
import torch
from helpers import save_tiny_model
from test_engine_equivalence import _hf_greedy

from hearth import LLM, SamplingParams
from hearth.engine.loader import load_hf_config
from hearth.engine.model_config import SUPPORTED_ARCHITECTURES
from hearth.engine.models.registry import registered_architectures

FAMILIES = ["gemma2", "gemma3", "phi3", "qwen3moe", "mixtral"]


def test_registry_builds_what_the_config_accepts():
    assert set(registered_architectures()) == set(SUPPORTED_ARCHITECTURES)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = save_tiny_model(tmp_path_factory.mktemp(request.param) / "hf", request.param)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return request.param, path, hf


def test_config_reads_the_family(family):
    arch, path, hf = family
    c = load_hf_config(path)
    if arch == "gemma2":
        assert c.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
        assert (c.attn_logit_softcapping, c.final_logit_softcapping) == (50.0, 30.0)
        assert c.hidden_act == "gelu_pytorch_tanh" and c.query_pre_attn_scalar == 24
    elif arch == "gemma3":
        assert c.qk_norm and c.rope.kind == "linear" and c.rope_local.theta == 10000.0
        assert c.layer_window(0) == 8 and c.layer_window(1) is None
    elif arch == "phi3":
        assert c.rope.kind == "longrope" and c.rope.rotary_dim(c.head_dim) == 12
        assert c.sliding_window == 12 and c.kv_window == 12
    elif arch == "qwen3moe":
        moe = c.moe
        assert (moe.num_experts, moe.num_experts_per_tok, moe.intermediate_size) == (8, 2, 32)
        assert c.moe.norm_topk_prob and c.moe.dense_layers == (0,) and c.qk_norm
    else:
        assert c.moe.norm_topk_prob and c.moe.intermediate_size == 48
    assert c.num_params == sum(p.numel() for p in hf.parameters())
    assert c.max_position_embeddings == 512  # not capped at the window


def test_greedy_matches_transformers(family):
    arch, path, hf = family
    gen = torch.Generator().manual_seed(1)
    prompt_ids = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (5, 17, 30, 1)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    want = _hf_greedy(hf, prompt_ids, 20, None)
    llm = LLM(str(path), device="cpu", dtype="float32", progress=False, block_size=8)
    batched = [o.outputs[0].token_ids for o in llm.generate(prompt_ids, params, use_tqdm=False)]
    assert batched == want
    alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompt_ids]
    assert alone == want
    chunked = LLM(str(path), device="cpu", dtype="float32", progress=False,
                  max_num_batched_tokens=7, block_size=8)
    outs = chunked.generate(prompt_ids, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want


@pytest.mark.parametrize("arch", ["qwen3moe", "mixtral"])
def test_fused_moe_kernel_in_the_model_matches_transformers(tmp_path, monkeypatch, arch):
    """The CUDA path's fused MoE kernel (kernels/moe.py), run by Triton's interpreter inside the
    model: prefill (sorted pairs) and decode (one pair a block) give transformers' tokens."""
    from transformers import AutoModelForCausalLM

    from hearth.engine.models.moe import MoEBlock

    monkeypatch.setattr(MoEBlock, "fused_on_cpu", True)
    path = save_tiny_model(tmp_path / arch, arch)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (4, 19)]
    llm = LLM(str(path), device="cpu", dtype="float32", progress=False, block_size=8)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outs == _hf_greedy(hf, prompts, 6, None)
