"""Phi-3 and Phi-4-mini: the Llama decoder as the checkpoint already fuses it.

The checkpoint holds `qkv_proj` and `gate_up_proj` (gate first), the layout Hearth runs, so the
tensors load whole and a quantized checkpoint's packed projections keep those names. What else
differs is configuration: long-context RoPE ("su" / longrope short and long factors) and
Phi-4-mini's partial rotary (RopeConfig), Phi-3-mini's sliding window (ModelConfig).
"""

from __future__ import annotations

from torch import nn

from hearth.engine.models.llama import DecoderLayer, LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    def make_layer(self, layer: int) -> nn.Module:
        return DecoderLayer(self.config, self.rotary, f"model.layers.{layer}", layer,
                            fused_checkpoint=True)
