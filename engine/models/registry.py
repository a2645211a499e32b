"""Model registry: the HF `architectures` name in a config picks the class."""

from __future__ import annotations

from torch import nn

from hearth.engine.model_config import ModelConfig
from hearth.engine.models.llama import LlamaForCausalLM
from hearth.engine.models.qwen import Qwen2ForCausalLM, Qwen3ForCausalLM

_MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def model_class(config: ModelConfig) -> type[nn.Module]:
    try:
        return _MODELS[config.architecture]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {config.architecture!r}; supported: {', '.join(_MODELS)}"
        ) from None
