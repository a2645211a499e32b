"""RoPE variants (engine/layers/rope_scaling.py) against transformers' own rotary embeddings on
positions up to 32k, read from config.json and from GGUF metadata; Llama 3.1-style GGUF files
(llama3 scaling as `rope_freqs.weight`) load and run."""

import json

import pytest
import torch
from helpers import llama3_freq_factors, save_tiny_model, write_gguf

from hearth.engine.layers.rope_scaling import cos_sin_table, longrope_row_offset
from hearth.engine.loader import load_gguf, load_hf_config
from hearth.engine.loader.hf import rope_config
from hearth.engine.rope_config import RopeConfig, rope_from_hf

transformers = pytest.importorskip("transformers")

HEAD_DIM = 64
POSITIONS = torch.tensor([0, 1, 7, 100, 1023, 4095, 4096, 8191, 8192, 16000, 24577, 32767])
MAX_POS = 32768
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
VARIANTS = {
    "default": ("Llama", {"rope_type": "default", "rope_theta": 10000.0}, 4096),
    "linear": ("Llama", {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}, 4096),
    "llama3": ("Llama", LLAMA3, 131072),
    "yarn": ("Qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings":
                       32768, "rope_theta": 1000000.0}, 131072),
    "yarn-beta": ("Qwen3", {"rope_type": "yarn", "factor": 2.0, "beta_fast": 16, "beta_slow": 2,
                            "original_max_position_embeddings": 4096, "rope_theta": 10000.0},
                  8192),
}


def _hf_config(arch, rope, max_pos, **extra):
    cls = getattr(transformers, f"{arch}Config")
    return cls(hidden_size=4 * HEAD_DIM, num_attention_heads=4, num_key_value_heads=2,
               head_dim=HEAD_DIM, max_position_embeddings=max_pos, rope_parameters=dict(rope),
               **extra)


def _hf_cos_sin(arch, config, positions):
    module = getattr(transformers.models, arch.lower())
    rotary = getattr(module, f"modeling_{arch.lower()}").__dict__[f"{arch}RotaryEmbedding"](config)
    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = rotary(x, positions[None, :])
    return cos[0], sin[0]  # (num_positions, rotary_dim)


def _ours(rope: RopeConfig, positions, head_dim=HEAD_DIM, max_pos=MAX_POS):
    table = cos_sin_table(rope, head_dim, max_pos)[positions]
    cos, sin = table.chunk(2, dim=-1)
    return torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)


def _rope_of(tmp_path, config) -> RopeConfig:
    """What Hearth reads from the config.json transformers writes."""
    config.save_pretrained(tmp_path)
    return rope_config(json.loads((tmp_path / "config.json").read_text()))


@pytest.mark.parametrize("name", VARIANTS)
def test_static_variants_match_transformers_to_32k(tmp_path, name):
    arch, params, max_pos = VARIANTS[name]
    config = _hf_config(arch, params, max_pos)
    rope = _rope_of(tmp_path, config)
    assert rope.kind == params["rope_type"]
    want_cos, want_sin = _hf_cos_sin(arch, config, POSITIONS)
    cos, sin = _ours(rope, POSITIONS)
    torch.testing.assert_close(cos, want_cos, rtol=0, atol=0)  # same float32 ops: bit for bit
    torch.testing.assert_close(sin, want_sin, rtol=0, atol=0)


def test_transformers_4_rope_scaling_dict_reads_the_same():
    v5 = rope_from_hf(LLAMA3, {"max_position_embeddings": 131072})
    v4_cfg = {"rope_theta": 500000.0, "max_position_embeddings": 131072,
              "rope_scaling": {k: v for k, v in LLAMA3.items() if k != "rope_theta"}}
    v4 = rope_from_hf(v4_cfg["rope_scaling"] | {"type": "llama3"}, v4_cfg)
    assert v4 == v5
    su = rope_from_hf({"type": "su", "short_factor": [1.0], "long_factor": [2.0]},
                      {"max_position_embeddings": 131072, "original_max_position_embeddings": 4096})
    assert su.kind == "longrope" and su.factor == 32.0


def test_dynamic_matches_transformers_at_each_newest_position(tmp_path):
    """transformers recomputes dynamic NTK frequencies from the longest position it is given:
    each of our rows equals transformers' rotation of that position as the newest token."""
    config = _hf_config("Llama", {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
                        4096)
    rope = _rope_of(tmp_path, config)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(raw | {"architectures": ["LlamaForCausalLM"],
                                                            "intermediate_size": 32}))
    assert rope.kind == "dynamic" and load_hf_config(tmp_path).max_position_embeddings == 16384
    for p in (0, 100, 4095, 4096, 5000, 16383):
        want_cos, want_sin = _hf_cos_sin("Llama", config, torch.tensor([p]))
        cos, sin = _ours(rope, torch.tensor([p]), max_pos=16384)
        # theta is a float32 tensor expression in transformers, a float64 one here
        torch.testing.assert_close(cos, want_cos, rtol=0, atol=2e-3)
        torch.testing.assert_close(sin, want_sin, rtol=0, atol=2e-3)


@pytest.mark.parametrize("partial", [1.0, 0.75])
def test_longrope_short_and_long_match_transformers(tmp_path, partial):
    dim = int(HEAD_DIM * partial)
    gen = torch.Generator().manual_seed(0)
    short = (1 + torch.rand(dim // 2, generator=gen)).tolist()
    long = (1 + 8 * torch.rand(dim // 2, generator=gen)).tolist()
    params = {"rope_type": "longrope", "short_factor": short, "long_factor": long,
              "rope_theta": 10000.0}
    config = _hf_config("Phi3", params, 131072, original_max_position_embeddings=4096,
                        partial_rotary_factor=partial)
    rope = _rope_of(tmp_path, config)
    assert rope.kind == "longrope" and rope.rotary_dim(HEAD_DIM) == dim
    assert rope.regime_switch == 4096
    offset = longrope_row_offset(rope, MAX_POS)
    assert offset == MAX_POS and cos_sin_table(rope, HEAD_DIM, MAX_POS).shape[0] == 2 * MAX_POS
    # transformers: every position of a forward pass rotates with the long factors once the
    # longest one passes 4096; a sequence that long reads the table's long half
    below = POSITIONS[POSITIONS < 4096]
    for positions, rows in ((below, below), (POSITIONS, POSITIONS + offset)):
        want_cos, want_sin = _hf_cos_sin("Phi3", config, positions)
        cos, sin = _ours(rope, rows)
        assert cos.shape[-1] == dim
        torch.testing.assert_close(cos, want_cos, rtol=0, atol=0)
        torch.testing.assert_close(sin, want_sin, rtol=0, atol=0)
    assert not torch.equal(_ours(rope, below)[0], _ours(rope, below + offset)[0])


def _write_tiny_gguf(path, extra_tensors=(), **metadata):
    """A one-layer llama GGUF whose only point is its RoPE metadata and tensors."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(131072)
    writer.add_embedding_length(4 * HEAD_DIM)
    writer.add_feed_forward_length(32)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(500000.0)
    for key, value in metadata.items():
        getattr(writer, f"add_{key}")(value)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "c", "d"])
    writer.add_token_merges([])
    rng = np.random.default_rng(0)
    h = 4 * HEAD_DIM
    shapes = {"token_embd.weight": (4, h), "output_norm.weight": (h,),
              "blk.0.attn_norm.weight": (h,), "blk.0.ffn_norm.weight": (h,),
              "blk.0.attn_q.weight": (h, h), "blk.0.attn_k.weight": (2 * HEAD_DIM, h),
              "blk.0.attn_v.weight": (2 * HEAD_DIM, h), "blk.0.attn_output.weight": (h, h),
              "blk.0.ffn_gate.weight": (32, h), "blk.0.ffn_up.weight": (32, h),
              "blk.0.ffn_down.weight": (h, 32)}
    for name, shape in shapes.items():
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    for name, tensor in extra_tensors:
        writer.add_tensor(name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_rope_freqs_is_llama3_scaling(tmp_path):
    """A Llama 3.1 GGUF: the converter's rope_freqs give transformers' llama3 rotation (the
    divisors are rounded to float32 once, so not bit for bit)."""
    path = tmp_path / "llama31.gguf"
    _write_tiny_gguf(path, [("rope_freqs.weight", llama3_freq_factors(LLAMA3, HEAD_DIM))])
    config = load_gguf(path).config
    assert config.rope.freq_factors and config.rope.theta == 500000.0
    want_cos, want_sin = _hf_cos_sin("Llama", _hf_config("Llama", LLAMA3, 131072), POSITIONS)
    cos, sin = _ours(config.rope, POSITIONS)
    torch.testing.assert_close(cos, want_cos, rtol=0, atol=2e-3)
    torch.testing.assert_close(sin, want_sin, rtol=0, atol=2e-3)


def test_gguf_yarn_and_linear_metadata(tmp_path):
    import gguf

    path = tmp_path / "yarn.gguf"
    _write_tiny_gguf(path, rope_scaling_type=gguf.RopeScalingType.YARN, rope_scaling_factor=4.0,
                     rope_scaling_orig_ctx_len=32768)
    rope = load_gguf(path).config.rope
    assert (rope.kind, rope.factor, rope.original_max_position) == ("yarn", 4.0, 32768)
    hf = _hf_config("Qwen2", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 500000.0,
                              "original_max_position_embeddings": 32768}, 131072)
    want_cos, _ = _hf_cos_sin("Qwen2", hf, POSITIONS)
    torch.testing.assert_close(_ours(rope, POSITIONS)[0], want_cos, rtol=0, atol=0)
    _write_tiny_gguf(path, rope_scaling_type=gguf.RopeScalingType.LINEAR, rope_scaling_factor=2.0)
    assert load_gguf(path).config.rope.kind == "linear"


def test_unsupported_rope_is_a_clear_error():
    with pytest.raises(ValueError, match="unsupported rope scaling type 'mystery'"):
        rope_from_hf({"rope_type": "mystery"}, {})
    with pytest.raises(ValueError, match="needs original_max_position"):
        RopeConfig(kind="yarn", factor=4.0)


# ----- whole models: greedy tokens equal transformers' -----

TINY_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
               "rope_theta": 10000.0}
TINY_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
             "rope_theta": 10000.0}


def _greedy_pair(path, model_path, n=16):
    from transformers import AutoModelForCausalLM

    from hearth import LLM, SamplingParams

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = torch.randint(3, 512, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    llm = LLM(str(model_path), device="cpu", dtype="float32", progress=False, block_size=16)
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    got = llm.generate([prompt[0].tolist()], params, use_tqdm=False)[0].outputs[0].token_ids
    return got, want[0, 40:].tolist(), hf


@pytest.mark.parametrize("arch,rope", [("llama", TINY_LLAMA3), ("qwen2", TINY_YARN),
                                       ("llama", {"rope_type": "linear", "factor": 2.0,
                                                  "rope_theta": 10000.0})])
def test_scaled_rope_models_match_transformers(tmp_path, arch, rope):
    path = save_tiny_model(tmp_path / arch, arch, rope_parameters=rope, head_dim=32)
    got, want, _ = _greedy_pair(path, path)
    assert got == want


def test_llama31_style_gguf_runs_like_transformers(tmp_path):
    """llama3 scaling as the converter writes it: the rope_freqs tensor, no metadata."""
    path = save_tiny_model(tmp_path / "hf", "llama", rope_parameters=TINY_LLAMA3, head_dim=32)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    gguf_path = write_gguf(tmp_path / "llama31.gguf", "llama", model,
                           [("rope_freqs.weight", llama3_freq_factors(TINY_LLAMA3, 32))])
    got, want, _ = _greedy_pair(path, gguf_path)
    assert got == want
