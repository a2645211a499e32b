"""GGUF tensor names (llama.cpp's) → the HF names Hearth's models load, per GGUF architecture.

    token_embd.weight            model.embed_tokens.weight
    blk.3.attn_q.weight          model.layers.3.self_attn.q_proj.weight
    blk.3.ffn_gate_exps.weight   model.layers.3.mlp.experts.gate_proj.weight   (experts stacked:
                                                                                 (E, out, in))

Tensors that describe RoPE rather than hold weights (rope_freqs, rope_factors_long/short) are
read into the config (engine/loader/gguf_config.py) and have no HF name.
"""

from __future__ import annotations

import re
from pathlib import Path

TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
_COMMON = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_MOE = {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}
_GEMMA = {  # four norms a layer; llama.cpp's "ffn_norm" is the one before the MLP
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_PHI3 = {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}  # fused in the file
BLOCK_NAMES: dict[str, dict[str, str]] = {
    "llama": {**_COMMON, **_MOE},  # Mixtral is "llama" with experts
    "qwen2": _COMMON,
    "qwen3": _COMMON,
    "qwen3moe": {**_COMMON, **_MOE},
    "gemma2": {**_COMMON, **_GEMMA},
    "gemma3": {**_COMMON, **_GEMMA},
    "phi3": {**_COMMON, **_PHI3},
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# llama.cpp before April 2024 wrote Mixtral's experts one tensor each: blk.N.ffn_gate.E.weight
_OLD_EXPERT = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight")


def hf_name(gguf_name: str, arch: str, path: str | Path) -> str | None:
    """The HF name of one GGUF tensor; None for RoPE tensors; ValueError for an unknown one."""
    if gguf_name in TOP_LEVEL:
        return TOP_LEVEL[gguf_name]
    if gguf_name in ROPE_TENSORS:
        return None
    names = BLOCK_NAMES[arch]
    old = _OLD_EXPERT.fullmatch(gguf_name)
    if old and "ffn_gate_exps" in names:
        layer, piece, expert = old.groups()
        return f"model.layers.{layer}.mlp.experts.{expert}.{piece}_proj.weight"
    match = _BLOCK_NAME.fullmatch(gguf_name)
    if match and match.group(2) in names:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{names[part]}.{kind}"
    known = sorted({*TOP_LEVEL, *(f"blk.N.{n}.weight" for n in names)})
    raise ValueError(
        f"{path}: tensor {gguf_name!r} has no place in a GGUF {arch!r} model in Hearth; the "
        f"tensors Hearth reads for {arch!r}: {', '.join(known)}"
    )
