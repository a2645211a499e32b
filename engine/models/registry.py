"""Model registry: the HF `architectures` name in a config picks the class."""

from __future__ import annotations

from torch import nn

from hearth.engine.model_config import ModelConfig
from hearth.engine.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from hearth.engine.models.llama import LlamaForCausalLM
from hearth.engine.models.mixtral import MixtralForCausalLM
from hearth.engine.models.phi3 import Phi3ForCausalLM
from hearth.engine.models.qwen import Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM

_MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
}


def registered_architectures() -> tuple[str, ...]:
    """What the registry builds (model_config.SUPPORTED_ARCHITECTURES must list the same)."""
    return tuple(_MODELS)


def model_class(config: ModelConfig) -> type[nn.Module]:
    try:
        return _MODELS[config.architecture]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {config.architecture!r}; supported: {', '.join(_MODELS)}"
        ) from None
