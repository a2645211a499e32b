"""Mixtral: the Llama decoder (Mistral's attention) with mixture-of-experts MLPs: top-2 of 8
experts, weights always renormalised (engine/models/moe.py; the checkpoint's block_sparse_moe
names map onto it)."""

from __future__ import annotations

from hearth.engine.models.llama import LlamaForCausalLM
from hearth.engine.models.moe import MoEModelMixin


class MixtralForCausalLM(MoEModelMixin, LlamaForCausalLM):
    pass
