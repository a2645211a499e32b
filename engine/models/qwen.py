"""Qwen2 and Qwen3: the Llama decoder with q/k/v bias (Qwen2) or per-head q/k RMSNorm (Qwen3);
Qwen3-MoE: Qwen3 with mixture-of-experts MLPs (engine/models/moe.py; dense where mlp_only_layers
or decoder_sparse_step say so).

The switches come from ModelConfig (attention_bias, qk_norm, moe), set by the config loader."""

from __future__ import annotations

from hearth.engine.models.llama import LlamaForCausalLM
from hearth.engine.models.moe import MoEModelMixin


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass


class Qwen3ForCausalLM(LlamaForCausalLM):
    pass


class Qwen3MoeForCausalLM(MoEModelMixin, Qwen3ForCausalLM):
    pass
