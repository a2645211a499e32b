"""Qwen2 and Qwen3: the Llama decoder with q/k/v bias (Qwen2) or per-head q/k RMSNorm (Qwen3).

Both switches come from ModelConfig (attention_bias, qk_norm), set by the config loader."""

from __future__ import annotations

from hearth.engine.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass


class Qwen3ForCausalLM(LlamaForCausalLM):
    pass
