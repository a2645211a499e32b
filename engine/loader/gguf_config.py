"""GGUF metadata (llama.cpp's keys) → ModelConfig, for every GGUF architecture Hearth runs.

What llama.cpp leaves implicit is filled in the way llama.cpp itself fills it (llama-model.cpp):
- Gemma 2 alternates sliding and global layers (even layers slide), Gemma 3 slides in five of
  every six; a file's `attention.sliding_window_pattern` overrides either;
- Gemma's query scale is 1/sqrt(head_dim), except the 27B models' 1/sqrt(hidden / heads);
- Gemma 3's sliding layers use RoPE theta `rope.freq_base_swa` (10,000 when absent), unscaled;
- Qwen3-MoE and Mixtral renormalise the top-k router weights;
- llama3 RoPE scaling travels as the `rope_freqs` tensor (one divisor per frequency), Phi-3's
  long-context RoPE as `rope_factors_short` / `rope_factors_long`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hearth.engine.model_config import FULL, SLIDING, ModelConfig, MoEConfig
from hearth.engine.rope_config import RopeConfig

ARCHITECTURES = {  # GGUF general.architecture → HF architecture
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
_SWA_PATTERN = {"gemma2": 2, "gemma3": 6}  # every n-th layer (1-based) is global


def hf_architecture(md: dict[str, Any]) -> str | None:
    """The HF architecture name of a GGUF file's metadata (Mixtral: `llama` with experts)."""
    arch = md.get("general.architecture")
    if arch == "llama" and md.get("llama.expert_count"):
        return "MixtralForCausalLM"
    return ARCHITECTURES.get(arch)


def supported_gguf_architectures() -> list[str]:
    from hearth.engine.model_config import SUPPORTED_ARCHITECTURES

    return [name for name, hf in ARCHITECTURES.items() if hf in SUPPORTED_ARCHITECTURES]


def gguf_model_config(md: dict[str, Any], tensors: dict[str, Any], path: str | Path) -> ModelConfig:
    """`tensors`: GGUF name → reader tensor (RoPE tensors are read here)."""
    arch = md.get("general.architecture")
    if arch not in supported_gguf_architectures():
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: "
            f"{', '.join(supported_gguf_architectures())}"
        )
    try:
        return _config(md, arch, tensors, path)
    except KeyError as e:
        raise ValueError(f"{path}: GGUF metadata lacks {e}") from e


def _config(md: dict[str, Any], arch: str, tensors: dict[str, Any], path) -> ModelConfig:
    hidden, num_heads = md[f"{arch}.embedding_length"], md[f"{arch}.attention.head_count"]
    head_dim = md.get(f"{arch}.attention.key_length") or hidden // num_heads
    num_layers = md[f"{arch}.block_count"]
    moe = _moe(md, arch)
    hf_arch = hf_architecture(md)
    gemma = arch in ("gemma2", "gemma3")
    window = md.get(f"{arch}.attention.sliding_window") or None
    return ModelConfig(
        architecture=hf_arch,
        vocab_size=len(md["tokenizer.ggml.tokens"]),
        hidden_size=hidden,
        intermediate_size=md[f"{arch}.feed_forward_length"],
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=md.get(f"{arch}.attention.head_count_kv") or num_heads,
        head_dim=head_dim,
        rms_norm_eps=float(md[f"{arch}.attention.layer_norm_rms_epsilon"]),
        rope=_rope(md, arch, tensors, head_dim, path),
        rope_local=_local_rope(md, arch),
        max_position_embeddings=md.get(f"{arch}.context_length", 2048),
        sliding_window=window,
        layer_types=_layer_types(md, arch, num_layers) if window else (),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias=arch == "qwen2",
        qk_norm=arch in ("qwen3", "qwen3moe", "gemma3"),
        hidden_act="gelu_pytorch_tanh" if gemma else "silu",
        query_pre_attn_scalar=_query_pre_attn_scalar(arch, num_layers, hidden, num_heads,
                                                     head_dim),
        attn_logit_softcapping=md.get(f"{arch}.attn_logit_softcapping") or None,
        final_logit_softcapping=md.get(f"{arch}.final_logit_softcapping") or None,
        moe=moe,
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_eos_ids(md),
        torch_dtype="float32",
    )


def _rope(md: dict[str, Any], arch: str, tensors: dict[str, Any], head_dim: int,
          path) -> RopeConfig:
    rot_dim = md.get(f"{arch}.rope.dimension_count", head_dim)
    if rot_dim > head_dim or rot_dim % 2:
        raise ValueError(f"{path}: rope.dimension_count {rot_dim} does not fit head_dim "
                         f"{head_dim}")
    kind = md.get(f"{arch}.rope.scaling.type", "none")
    factor = float(md.get(f"{arch}.rope.scaling.factor") or 1.0)
    original = md.get(f"{arch}.rope.scaling.original_context_length") or None
    rope = RopeConfig(theta=float(md.get(f"{arch}.rope.freq_base", 10000.0)),
                      partial_rotary_factor=rot_dim / head_dim)
    if "rope_freqs.weight" in tensors:  # llama3 scaling, precomputed by the converter
        rope = rope.replace(freq_factors=tuple(_floats(tensors["rope_freqs.weight"])))
    if "rope_factors_long.weight" in tensors:  # Phi-3 longrope ("su")
        context = md.get(f"{arch}.context_length", 2048)
        return rope.replace(
            kind="longrope", original_max_position=original or context,
            factor=context / (original or context),
            attention_factor=md.get(f"{arch}.rope.scaling.attn_factor"),
            short_factor=tuple(_floats(tensors["rope_factors_short.weight"])),
            long_factor=tuple(_floats(tensors["rope_factors_long.weight"])),
        )
    if kind == "linear" and factor != 1.0:
        return rope.replace(kind="linear", factor=factor)
    if kind == "yarn":
        extra = {k: md[f"{arch}.rope.scaling.yarn_{k}"] for k in ("beta_fast", "beta_slow")
                 if md.get(f"{arch}.rope.scaling.yarn_{k}")}
        return rope.replace(kind="yarn", factor=factor, original_max_position=original,
                            attention_factor=md.get(f"{arch}.rope.scaling.yarn_attn_factor"),
                            **extra)
    if kind not in ("none", "linear"):
        raise ValueError(f"{path}: RoPE scaling type {kind!r} is not supported (Hearth reads "
                         "none, linear, yarn, llama3 rope_freqs and Phi-3 longrope factors)")
    return rope


def _local_rope(md: dict[str, Any], arch: str) -> RopeConfig | None:
    if arch != "gemma3":
        return None
    return RopeConfig(theta=float(md.get(f"{arch}.rope.freq_base_swa") or 10000.0))


def _layer_types(md: dict[str, Any], arch: str, num_layers: int) -> tuple[str, ...]:
    pattern = md.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list | tuple) and len(pattern) == num_layers:
        return tuple(SLIDING if p else FULL for p in pattern)
    every = _SWA_PATTERN.get(arch)
    if every is None:
        return ()  # every layer slides
    return tuple(SLIDING if (i + 1) % every else FULL for i in range(num_layers))


def _query_pre_attn_scalar(arch: str, num_layers: int, hidden: int, num_heads: int,
                           head_dim: int) -> float | None:
    if arch not in _GEMMA_27B_LAYERS:
        return None
    if num_layers == _GEMMA_27B_LAYERS[arch]:
        return hidden / num_heads
    return float(head_dim)


def _moe(md: dict[str, Any], arch: str) -> MoEConfig | None:
    num_experts = md.get(f"{arch}.expert_count") or 0
    if not num_experts:
        return None
    size = md.get(f"{arch}.expert_feed_forward_length") or md[f"{arch}.feed_forward_length"]
    return MoEConfig(num_experts=num_experts, num_experts_per_tok=md[f"{arch}.expert_used_count"],
                     intermediate_size=size,
                     norm_topk_prob=bool(md.get(f"{arch}.expert_weights_norm", True)))


def _floats(tensor: Any) -> list[float]:
    return [float(x) for x in np.asarray(tensor.data, dtype=np.float32).reshape(-1)]


def _eos_ids(md: dict[str, Any]) -> tuple[int, ...]:
    ids = (md.get(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom"))
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))
