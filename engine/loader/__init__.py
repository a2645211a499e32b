"""Model loading: a resolved catalogue entry → config, tokenizer and a stream of HF-named tensors.

The engine consumes only `LoadedSource`; whether the files were a GGUF or an HF directory is
settled here. Tensor names always follow transformers' naming ("model.layers.0.self_attn.q_proj
.weight", ...; "lm_head.weight" only when the checkpoint has one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from hearth.engine.catalog import ResolvedModel
from hearth.engine.loader.gguf_loader import GGUFModel, load_gguf
from hearth.engine.loader.hf import iter_hf_weights, load_hf_config
from hearth.engine.model_config import ModelConfig
from hearth.engine.tokenizer import Tokenizer

__all__ = [
    "GGUFModel",
    "LoadedSource",
    "iter_hf_weights",
    "load_gguf",
    "load_hf_config",
    "load_model_source",
]


@dataclass(frozen=True)
class LoadedSource:
    name: str
    config: ModelConfig
    tokenizer: Tokenizer
    weights: Callable[[], Iterator[tuple[str, torch.Tensor]]]  # a fresh iterator per call
    max_model_len: int  # the model's limit, capped by the catalogue's max_model_len
    quantization: str | None = None  # e.g. "Q4_1" for a GGUF, "awq" for an AWQ checkpoint


def load_model_source(resolved: ResolvedModel, gguf_keep_quantized: bool = False) -> LoadedSource:
    """Read config and tokenizer now; weights are read when `weights()` is iterated.

    A GGUF's weights come dequantized to float unless `gguf_keep_quantized`; an HF directory's
    quantized weights (config.json's quantization_config) always stay packed."""
    if resolved.format == "gguf":
        gguf = load_gguf(resolved.path, keep_quantized=gguf_keep_quantized)
        config, tokenizer, weights, quant = (
            gguf.config,
            gguf.tokenizer,
            gguf.weights,
            gguf.quantization,
        )
    elif resolved.format == "hf":
        config, tokenizer = load_hf_config(resolved.path), Tokenizer.from_hf_dir(resolved.path)
        iter_hf_weights(resolved.path)  # validates the files now, before the model is built
        weights = lambda: iter_hf_weights(resolved.path)  # noqa: E731
        quant = config.quantization.method if config.quantization else None
    else:
        raise ValueError(f"unknown model format {resolved.format!r}; expected 'gguf' or 'hf'")
    # Stop on every id either the config or the tokenizer files call end-of-sequence.
    eos_ids = tuple(dict.fromkeys((*config.eos_token_ids, *tokenizer.eos_token_ids)))
    config = dataclasses.replace(config, eos_token_ids=eos_ids)
    spec = resolved.spec
    if spec is not None:
        _check_architecture(resolved, config)
        if spec.chat_template:
            tokenizer = tokenizer.with_chat_template(spec.chat_template)
    max_len = config.max_position_embeddings
    if spec is not None and spec.max_model_len:
        max_len = min(max_len, spec.max_model_len)
    return LoadedSource(resolved.name, config, tokenizer, weights, max_len, quant)


def _check_architecture(resolved: ResolvedModel, config: ModelConfig) -> None:
    expected = resolved.spec.architecture
    if expected and expected != config.architecture:
        raise ValueError(
            f"model {resolved.name!r}: the catalogue says {expected}, but {resolved.path} holds "
            f"{config.architecture}; fix `architecture` in models.toml"
        )
