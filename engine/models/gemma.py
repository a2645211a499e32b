"""Gemma 2 and Gemma 3 (text): the Llama decoder's attention and MLP with Gemma's differences.

    embeddings        scaled by sqrt(hidden_size) (rounded to the model dtype, as transformers)
    norms             (1 + w) RMSNorm (GemmaRMSNorm), four a layer:
                        x = x + post_attention_norm(attn(input_norm(x)))
                        x = x + post_feedforward_norm(mlp(pre_feedforward_norm(x)))
    MLP               GeGLU: gelu_tanh(gate) * up
    attention         scores scaled by query_pre_attn_scalar^-1/2; local (sliding-window) and
                      global layers interleaved (ModelConfig.layer_types); Gemma 2 soft-caps the
                      scores (attn_logit_softcapping), Gemma 3 normalises q and k per head and
                      gives its local layers their own RoPE (theta 10,000, unscaled)
    logits            Gemma 2: soft-capped (final_logit_softcapping)
"""

from __future__ import annotations

import torch
from torch import nn

from hearth.engine.layers.norm import GemmaRMSNorm
from hearth.engine.layers.rotary import RotaryEmbedding
from hearth.engine.model_config import SLIDING, ModelConfig
from hearth.engine.models.llama import MLP, Attention, LlamaForCausalLM


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, prefix: str,
                 layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, rotary, f"{prefix}.self_attn", layer, GemmaRMSNorm)
        self.mlp = MLP(config, f"{prefix}.mlp")
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(h, eps)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps)

    def forward(self, positions, hidden, residual, kv_cache, meta, backend):
        """hidden: the previous layer's output, not yet in `residual` (the stream)."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_attention_layernorm(
            self.self_attn(positions, hidden, kv_cache, meta, backend))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class Gemma2ForCausalLM(LlamaForCausalLM):
    norm_class = GemmaRMSNorm

    def make_layer(self, layer: int) -> nn.Module:
        return GemmaDecoderLayer(self.config, self.rotary_of(layer), f"model.layers.{layer}",
                                 layer)

    def rotary_of(self, layer: int) -> RotaryEmbedding:
        return self.rotary

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        return hidden * torch.tensor(self.config.hidden_size**0.5, dtype=hidden.dtype)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def load_special(self, hf_name: str, tensor: torch.Tensor) -> str | None:
        """Checkpoints hold w of Gemma's (1 + w) norms; the parameter holds the sum."""
        if "norm" not in hf_name or (target := self.map_name(hf_name)) is None:
            return None
        name = target[0]
        module = self.get_submodule(name.rpartition(".")[0])
        if not isinstance(module, GemmaRMSNorm):
            return None
        if tensor.shape != module.weight.shape:
            raise ValueError(f"checkpoint tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(module.weight.shape)}")
        module.load_offset_weight(tensor)
        return name


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 2's network plus q/k norms (ModelConfig.qk_norm) and a second RoPE for the local
    layers (ModelConfig.rope_local)."""

    def make_rotaries(self) -> None:
        super().make_rotaries()
        c = self.config
        self.rotary_local = RotaryEmbedding(c.head_dim, c.max_position_embeddings,
                                            c.rope_local or c.rope)

    def rotary_of(self, layer: int) -> RotaryEmbedding:
        types = self.config.layer_types
        return self.rotary_local if types and types[layer] == SLIDING else self.rotary

    def rotaries(self) -> list[RotaryEmbedding]:
        return [self.rotary, self.rotary_local]
