"""Gated MLP activations over a fused gate_up projection: SiLU (Llama, Qwen, Phi-3, Mistral) and
tanh-approximated GELU (Gemma)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: (num_tokens, 2 * d) holding [gate | up] -> (num_tokens, d)."""
    if x.is_cuda and x.dim() == 2:
        from hearth.kernels.fused import silu_and_mul as fused

        return fused(x)
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: (num_tokens, 2 * d) holding [gate | up] -> gelu_tanh(gate) * up, (num_tokens, d)."""
    d = x.shape[-1] // 2
    return F.gelu(x[..., :d], approximate="tanh") * x[..., d:]


_ACTIVATIONS = {"silu": silu_and_mul, "gelu_pytorch_tanh": gelu_tanh_and_mul,
                "gelu_tanh": gelu_tanh_and_mul}


def gated_activation(name: str):
    """The `*_and_mul` function of a config's hidden_act."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {name!r}; supported: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]
