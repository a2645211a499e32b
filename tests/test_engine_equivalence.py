"""Greedy output token-identical to transformers (float32, same weights): alone, batched,
chunked."""

from __future__ import annotations

import pytest
import torch
from helpers import DEFAULT_GGUF, default_model_dir, save_tiny_model

from hearth import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "1, 2, 3, 4,",
    "def fibonacci(n):",
    "Explain in two sentences why the sky is blue, and mention Rayleigh scattering by name so "
    "that a curious ten year old could follow the argument without any trouble at all.",
    "Hi",
]


def _hf_greedy(model, prompt_ids: list[list[int]], max_new_tokens: int, eos: int | None):
    outs = []
    if eos is None:  # ignore_eos: generate exactly max_new_tokens
        model.generation_config.eos_token_id = None
    for ids in prompt_ids:
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                               do_sample=False, eos_token_id=eos, pad_token_id=eos or 0,
                               min_new_tokens=0 if eos is not None else max_new_tokens)
        outs.append(y[0, len(ids):].tolist())
    return outs


def _trim_after_eos(tokens: list[int], eos: int | None) -> list[int]:
    if eos is not None and eos in tokens:
        return tokens[: tokens.index(eos) + 1]
    return tokens


@pytest.fixture(scope="module")
def default_llm():
    llm = LLM(device="cpu", dtype="float32", progress=False)
    yield llm
    llm.shutdown()


def test_default_model_batch_matches_transformers(default_llm):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        default_model_dir(), gguf_file=DEFAULT_GGUF, dtype=torch.float32
    ).eval()
    tok = default_llm.tokenizer
    prompt_ids = [tok.encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=48)
    ours = default_llm.generate(prompt_ids, params, use_tqdm=False)  # ONE batch
    eos = tok.eos_token_ids[0]
    ref = _hf_greedy(hf, prompt_ids, 48, eos)
    for prompt, out, want in zip(PROMPTS, ours, ref):
        assert out.outputs[0].token_ids == _trim_after_eos(want, eos), prompt


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_models_match_transformers(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    path = save_tiny_model(tmp_path / arch, arch)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(1)
    prompt_ids = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (5, 17, 33, 64, 1)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    llm = LLM(str(path), device="cpu", dtype="float32", progress=False, block_size=16)
    batched = [o.outputs[0].token_ids for o in llm.generate(prompt_ids, params, use_tqdm=False)]
    assert batched == _hf_greedy(hf, prompt_ids, 24, None)
    alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompt_ids]
    assert alone == batched
    chunked = LLM(str(path), device="cpu", dtype="float32", progress=False,
                  max_num_batched_tokens=7, block_size=8)
    assert [o.outputs[0].token_ids for o in chunked.generate(prompt_ids, params,
                                                             use_tqdm=False)] == batched


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_triton_attention_backend_matches_transformers_in_interpreter(tmp_path, monkeypatch, arch):
    """The CUDA attention backend (engine/triton_attention.py: rotary and the K/V write fused
    into decode attention, q/k rotated by the backend) run by Triton's interpreter on CPU gives
    transformers' greedy tokens; prefill, decode-only and chunked mixed steps all occur."""
    from transformers import AutoModelForCausalLM

    from hearth.engine import model_builder, model_runner
    from hearth.engine.triton_attention import TritonAttention

    for module in (model_runner, model_builder):
        monkeypatch.setattr(module, "make_attention_backend", lambda device: TritonAttention())
    path = save_tiny_model(tmp_path / arch, arch)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(2)
    prompt_ids = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (5, 21, 1)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = LLM(str(path), device="cpu", dtype="float32", progress=False, block_size=8,
              max_num_batched_tokens=16)
    assert isinstance(llm.engine.runner.backend, TritonAttention)
    outs = [o.outputs[0].token_ids for o in llm.generate(prompt_ids, params, use_tqdm=False)]
    assert outs == _hf_greedy(hf, prompt_ids, 8, None)
