"""Mixture-of-experts MLP (Qwen3-MoE, Mixtral): a router picks k experts per token and weights
their outputs.

    router      logits = x @ gate^T (E,), softmax in float32, top-k; renormalised to sum 1 where
                the model does (Mixtral always, Qwen3-MoE with norm_topk_prob), then cast to the
                model dtype (transformers' Qwen3MoeTopKRouter)
    experts     w13 (E, 2I, H) = [gate | up], w2 (E, H, I); y = w2[e] @ act(gate) * up
    CUDA        kernels/moe.py's fused kernel (tokens sorted by expert, grouped GEMMs, the weight
                in the epilogue); elsewhere a loop over the routed experts, in transformers'
                order (the CPU reference, bit for bit in float32)

Checkpoint names, all loaded into w13 / w2 (`load_expert`):
    Qwen3-MoE   mlp.experts.{e}.gate_proj / up_proj / down_proj.weight, mlp.gate.weight
    Mixtral     block_sparse_moe.experts.{e}.w1 / w3 / w2.weight, block_sparse_moe.gate.weight
    stacked     mlp.experts.gate_proj / up_proj / down_proj.weight (E, out, in): GGUF files
    fused       mlp.experts.gate_up_proj, mlp.experts.down_proj (transformers 5 in memory)
"""

from __future__ import annotations

import re

import torch
from torch import nn

from hearth.engine.layers.activation import gated_activation
from hearth.engine.model_config import ModelConfig

_EXPERT = re.compile(r"(?:model\.)?layers\.(\d+)\.mlp\.experts\.(?:(\d+)\.)?(\w+?)(?:\.weight)?")
_PIECES = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down",
           "w2": "down", "gate_up_proj": "gate_up"}


def route(logits: torch.Tensor, top_k: int, renormalize: bool,
          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, E) router logits -> (weights (T, k) in `dtype`, expert ids (T, k))."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(dtype), ids


class MoEBlock(nn.Module):
    fused_on_cpu = False  # tests: the fused kernel on CPU, in Triton's interpreter

    def __init__(self, config: ModelConfig, prefix: str) -> None:
        super().__init__()
        moe, h = config.moe, config.hidden_size
        if config.quantization is not None and config.quantization.method != "gguf":
            raise ValueError(f"{prefix}: {config.quantization.method} mixture-of-experts "
                             "checkpoints are not supported; use a float checkpoint or a GGUF "
                             "file (its experts are loaded dequantized)")
        self.num_experts, self.top_k = moe.num_experts, moe.num_experts_per_tok
        self.renormalize, self.inter = moe.norm_topk_prob, moe.intermediate_size
        self.gate = nn.Linear(h, moe.num_experts, bias=False)
        self.w13 = nn.Parameter(torch.empty(moe.num_experts, 2 * self.inter, h))
        self.w2 = nn.Parameter(torch.empty(moe.num_experts, h, self.inter))
        self.act_and_mul = gated_activation(config.hidden_act)
        self.fused = config.hidden_act == "silu"  # the kernel gates with SiLU
        self._rows_loaded = {"w13": 0, "w2": 0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (num_tokens, hidden) -> (num_tokens, hidden)."""
        weights, ids = route(self.gate(x), self.top_k, self.renormalize, x.dtype)
        if (x.is_cuda or self.fused_on_cpu) and self.fused:
            from hearth.kernels.moe import fused_moe

            return fused_moe(x, self.w13, self.w2, weights, ids)
        return self._experts_loop(x, weights, ids)

    def _experts_loop(self, x: torch.Tensor, weights: torch.Tensor,
                      ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in ids.unique().tolist():  # ascending, as transformers adds them
            token, slot = torch.where(ids == e)
            inter = self.act_and_mul(torch.nn.functional.linear(x[token], self.w13[e]))
            y = torch.nn.functional.linear(inter, self.w2[e]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def load_expert(self, expert: int | None, piece: str, tensor: torch.Tensor) -> None:
        """One checkpoint tensor: an expert's piece (expert given) or all experts' (stacked)."""
        experts = slice(None) if expert is None else expert
        inter = self.inter
        target = {"gate": (self.w13, slice(0, inter)), "up": (self.w13, slice(inter, 2 * inter)),
                  "gate_up": (self.w13, slice(None)), "down": (self.w2, slice(None))}[piece]
        param, rows = target
        dst = param.data[experts, rows]
        if dst.shape != tensor.shape:
            raise ValueError(f"expert tensor {piece} has shape {tuple(tensor.shape)}, expected "
                             f"{tuple(dst.shape)}")
        dst.copy_(tensor)
        name = "w13" if param is self.w13 else "w2"
        self._rows_loaded[name] += dst.numel() // param.shape[-1]

    def check_loaded(self, prefix: str) -> None:
        for name in ("w13", "w2"):
            param = getattr(self, name)
            if self._rows_loaded[name] != param.numel() // param.shape[-1]:
                raise ValueError(f"checkpoint is missing expert weights of {prefix}.{name}")


class MoEModelMixin:
    """load_special / completeness checks for a LlamaForCausalLM subclass with MoE layers."""

    def load_special(self, hf_name: str, tensor: torch.Tensor) -> str | None:
        name = hf_name.replace(".block_sparse_moe.", ".mlp.")
        match = _EXPERT.fullmatch(name)
        if match is None or match.group(3) not in _PIECES:
            return None
        layer, expert, piece = match.groups()
        block = self.layers[int(layer)].mlp
        if not isinstance(block, MoEBlock):
            raise ValueError(f"checkpoint tensor {hf_name!r}: layer {layer} has no experts")
        block.load_expert(None if expert is None else int(expert), _PIECES[piece], tensor)
        return f"layers.{layer}.mlp.{'w2' if _PIECES[piece] == 'down' else 'w13'}"

    def map_name(self, hf_name: str):
        return super().map_name(hf_name.replace(".block_sparse_moe.", ".mlp."))

    def _check_all_loaded(self, params: dict, loaded: set[str]) -> None:
        super()._check_all_loaded(params, loaded)
        for i, layer in enumerate(self.layers):
            if isinstance(layer.mlp, MoEBlock):
                layer.mlp.check_loaded(f"layers.{i}.mlp")
