"""GGUF files written by llama.cpp's own converter (tests/data/gguf, .ci/gguf-converter) against
transformers on the HF directories they were converted from:

    F16     every tensor equals the checkpoint's; greedy tokens equal transformers'
    Q8_0    kept quantized (gguf_keep_quantized) = Hearth's dequantized-float run, token for token;
            first-step log-probabilities close to transformers' on the float weights
    Q4_K_M  every family's tensors re-typed as llama-quantize's Q4_K_M picks them (Q4_K and Q6_K
            in the 256-wide down projections, experts included; Q5_0 / Q5_1 / Q8_0 where rows
            are narrower): loads, same two checks
    MIXED   llama's tensors re-typed by hand (Q4_K, Q6_K, Q5_0, Q4_0, Q4_1, Q8_0 in one file):
            loads, same two checks
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_engine_equivalence import _hf_greedy

from hearth import LLM, SamplingParams
from hearth.engine.layers.linear import GGUFLinear
from hearth.engine.loader import load_gguf

transformers = pytest.importorskip("transformers")

DATA = Path(__file__).parent / "data" / "gguf"
DENSE = ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]
MOE = ["qwen3moe", "mixtral"]
FAMILIES = DENSE + MOE
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def reference():
    """family -> (transformers model on the HF directory, float32; prompts)."""
    cache = {}

    def get(family: str):
        if family not in cache:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                DATA / family, dtype=torch.float32).eval()
            gen = torch.Generator().manual_seed(0)
            vocab = model.config.vocab_size
            prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (5, 23, 40)]
            cache[family] = (model, prompts)
        return cache[family]

    return get


def _llm(path: Path, **kwargs) -> LLM:
    return LLM(str(path), device="cpu", dtype="float32", progress=False, block_size=8, **kwargs)


def _greedy(llm: LLM, prompts, logprobs: int | None = None):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True,
                            logprobs=logprobs)
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


def _stacked_experts(state: dict) -> dict:
    """Per-expert checkpoint tensors as the GGUF holds them: one (E, out, in) tensor a piece."""
    pieces = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    out, experts = {}, {}
    for name, tensor in state.items():
        name = name.replace(".block_sparse_moe.", ".mlp.")
        match = re.fullmatch(r"(.*\.mlp\.experts)\.(\d+)\.(\w+)\.weight", name)
        if match is None:
            out[name] = tensor
            continue
        prefix, expert, piece = match.groups()
        experts.setdefault(f"{prefix}.{pieces.get(piece, piece)}.weight", {})[int(expert)] = tensor
    for name, by_expert in experts.items():
        out[name] = torch.stack([by_expert[e] for e in sorted(by_expert)])
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_f16_tensors_are_the_checkpoints(family):
    expected = _stacked_experts(load_file(str(DATA / family / "model.safetensors")))
    loaded = dict(load_gguf(DATA / f"{family}-F16.gguf").weights())
    assert loaded.keys() == expected.keys() - {"lm_head.weight"} or loaded.keys() == expected.keys()
    for name, tensor in loaded.items():
        torch.testing.assert_close(tensor, expected[name].float(), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_f16_greedy_matches_transformers(family, reference):
    model, prompts = reference(family)
    llm = _llm(DATA / f"{family}-F16.gguf")
    try:
        got = [o.token_ids for o in _greedy(llm, prompts)]
    finally:
        llm.shutdown()
    assert got == _hf_greedy(model, prompts, NEW_TOKENS, None)


def _hf_first_logprobs(model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].float()
    return torch.log_softmax(logits, -1)


@pytest.mark.parametrize("name,tolerance", [
    *((f"{family}-Q8_0.gguf", 0.15) for family in FAMILIES),
    *((f"{family}-Q4_K_M.gguf", 0.6) for family in FAMILIES),  # 4-5 bits, 32-wide random models
    ("llama-MIXED.gguf", 0.6),
])
def test_quantized_kept_equals_dequantized_and_is_close(name, tolerance, reference):
    model, prompts = reference(name.split("-")[0])
    dense, kept = _llm(DATA / name), _llm(DATA / name, gguf_keep_quantized=True)
    # experts stay float (the fused MoE kernel reads float weights): in the MoE Q4_K_M files the
    # K blocks are all the experts', and the 32-wide attention is Q5_0, which no kernel keeps
    keeps = not (name.endswith("Q4_K_M.gguf") and name.split("-")[0] in MOE)
    try:
        assert any(isinstance(m, GGUFLinear) for m in kept.engine.runner.model.modules()) == keeps
        dense_out, kept_out = _greedy(dense, prompts, 5), _greedy(kept, prompts, 5)
    finally:
        dense.shutdown()
        kept.shutdown()
    assert [o.token_ids for o in kept_out] == [o.token_ids for o in dense_out]
    for prompt, out in zip(prompts, dense_out):
        want = _hf_first_logprobs(model, prompt)
        first = out.logprobs[0]
        got = torch.tensor(first.top_logprobs)
        torch.testing.assert_close(got, want[torch.tensor(first.top_token_ids)], rtol=0,
                                   atol=tolerance)


def test_mixed_file_holds_every_type():
    types = {t.tensor_type.name for t in __import__("gguf").GGUFReader(
        DATA / "llama-MIXED.gguf").tensors}
    assert {"Q4_K", "Q6_K", "Q5_0", "Q4_0", "Q4_1", "Q8_0", "F32"} <= types
    kept = load_gguf(DATA / "llama-MIXED.gguf", keep_quantized=True).config.quantization
    assert set(kept.gguf_types.values()) == {"Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"}


@pytest.mark.parametrize("family", FAMILIES)
def test_q4_k_m_files_hold_k_blocks_where_llama_cpp_puts_them(family):
    """Q4_K_M: the down projections (experts too) Q6_K on use_more_bits layers and Q4_K on the
    others; narrower rows fall back as llama-quantize does; both K types load."""
    import gguf

    path = DATA / f"{family}-Q4_K_M.gguf"
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    down = {types[name] for name in types if ".ffn_down" in name}
    assert down == {"Q4_K", "Q6_K"}
    assert set(types.values()) <= {"Q4_K", "Q6_K", "Q5_0", "Q5_1", "Q8_0", "F16", "F32"}
    weights = dict(load_gguf(path).weights())
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())


def test_mistral_window_dropped_by_the_converter_and_honoured_when_present(reference):
    """llama.cpp's converter writes Mistral as `llama` without its sliding window (llama.cpp runs
    Mistral 7B v0.1 with full attention too); a file that carries llama.attention.sliding_window
    (mistral-F16-SWA.gguf: the F16 file plus that key) runs windowed, as transformers does."""
    assert load_gguf(DATA / "mistral-F16.gguf").config.sliding_window is None
    config = load_gguf(DATA / "mistral-F16-SWA.gguf").config
    assert config.sliding_window == 8 and config.kv_window == 8
    expected = load_file(str(DATA / "mistral" / "model.safetensors"))
    for name, tensor in load_gguf(DATA / "mistral-F16-SWA.gguf").weights():
        torch.testing.assert_close(tensor, expected[name].float(), rtol=0, atol=0, msg=name)
    model, prompts = reference("mistral")
    llm = _llm(DATA / "mistral-F16-SWA.gguf")
    try:
        got = [o.token_ids for o in _greedy(llm, prompts)]
    finally:
        llm.shutdown()
    assert got == _hf_greedy(model, prompts, NEW_TOKENS, None)


def test_old_mixtral_files_with_one_tensor_per_expert_map_onto_the_experts():
    """llama.cpp wrote Mixtral's experts one tensor each before April 2024 (TheBloke's files)."""
    from hearth.engine.loader.gguf_names import hf_name

    assert hf_name("blk.3.ffn_gate.7.weight", "llama", "x.gguf") == (
        "model.layers.3.mlp.experts.7.gate_proj.weight")
    assert hf_name("blk.0.ffn_down.0.weight", "llama", "x.gguf") == (
        "model.layers.0.mlp.experts.0.down_proj.weight")
    assert hf_name("blk.0.ffn_gate_exps.weight", "qwen3moe", "x.gguf") == (
        "model.layers.0.mlp.experts.gate_proj.weight")
    with pytest.raises(ValueError, match="has no place"):
        hf_name("blk.0.ffn_gate.0.weight", "qwen2", "x.gguf")
