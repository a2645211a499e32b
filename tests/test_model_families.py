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

FAMILIES = ["mistral", "gemma2", "gemma3", "phi3", "qwen3moe", "mixtral"]


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
    if arch == "mistral":
        assert c.sliding_window == 8 and c.layer_types == () and c.kv_window == 8
    elif arch == "gemma2":
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


def test_mistral_runs_past_a_cache_smaller_than_its_history(tmp_path):
    """Window 8, 12 blocks of 8 (96 slots): four sequences of 60-token prompts and 50 new tokens
    each (440 tokens of history) run at once, released blocks counted, transformers' tokens."""
    from transformers import AutoModelForCausalLM

    path = save_tiny_model(tmp_path / "mistral", "mistral")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 512, (60,), generator=gen).tolist() for _ in range(4)]
    llm = LLM(str(path), device="cpu", dtype="float32", progress=False, block_size=8,
              num_kv_blocks=12, max_num_batched_tokens=16)
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    outs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    assert [o.token_ids for o in outs] == _hf_greedy(hf, prompts, 50, None)
    snapshot = llm.engine.scheduler.block_manager.snapshot()
    assert snapshot.num_window_freed >= 4 * (110 - 8) // 8 - 8
    assert llm.engine.scheduler.num_preemptions == 0


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "phi3"])
def test_triton_attention_backend_with_windows_in_interpreter(tmp_path, monkeypatch, arch):
    """The CUDA attention backend (window bound and soft-cap in the decode and prefill kernels,
    partial rotary outside them) run by Triton's interpreter: transformers' greedy tokens."""
    from transformers import AutoModelForCausalLM

    from hearth.engine import model_builder, model_runner
    from hearth.engine.triton_attention import TritonAttention

    for module in (model_runner, model_builder):
        monkeypatch.setattr(module, "make_attention_backend", lambda device: TritonAttention())
    path = save_tiny_model(tmp_path / arch, arch)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (5, 21)]
    llm = LLM(str(path), device="cpu", dtype="float32", progress=False, block_size=8,
              max_num_batched_tokens=16)
    assert isinstance(llm.engine.runner.backend, TritonAttention)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outs == _hf_greedy(hf, prompts, 12, None)


def test_mistral_prefix_cache_hit_after_the_window_released_blocks(tmp_path):
    """A second request sharing a long prefix with a finished one attaches its cached blocks
    (those the window released too) and still gives transformers' tokens."""
    from transformers import AutoModelForCausalLM

    path = save_tiny_model(tmp_path / "mistral", "mistral")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    stem = torch.randint(3, 512, (48,), generator=torch.Generator().manual_seed(5)).tolist()
    prompts = [stem + [7, 8, 9], stem + [10, 11]]
    llm = LLM(str(path), device="cpu", dtype="float32", progress=False, block_size=8,
              num_kv_blocks=32)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    first = llm.generate([prompts[0]], params, use_tqdm=False)[0]
    second = llm.generate([prompts[1]], params, use_tqdm=False)[0]
    assert second.num_cached_tokens == 48
    want = _hf_greedy(hf, prompts, 20, None)
    assert [first.outputs[0].token_ids, second.outputs[0].token_ids] == want
