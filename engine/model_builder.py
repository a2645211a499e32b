"""Build what an engine needs from an EngineConfig: the resolved model, its weights on the device,
the tokenizer, the context length, and a ModelRunner with a KV cache sized from the memory budget.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.catalog import resolve_model, verify
from engine.config import DEFAULT_CPU_KV_CACHE_GIB, EngineConfig
from engine.loader import load_model_source
from engine.model_config import ModelConfig
from engine.model_runner import ModelRunner, resolve_dtype
from engine.models.registry import model_class
from engine.progress import progress_bar

logger = logging.getLogger(__name__)
_GIB = 1 << 30


@dataclass
class BuiltModel:
    name: str
    tokenizer: object
    model_config: ModelConfig
    max_model_len: int
    runner: ModelRunner


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for, but no CUDA GPU is available; use 'cpu'")
    return torch.device(device)


def build_model(config: EngineConfig, progress: bool = True) -> BuiltModel:
    resolved = resolve_model(config.model)
    if config.load_format != "dummy":
        verify(resolved)
    source = load_model_source(resolved)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    model = _instantiate(source, config, device, dtype, progress)
    max_model_len = _max_model_len(config, source)
    num_blocks = _num_kv_blocks(config, source.config, device, dtype, max_model_len)
    runner = ModelRunner(model, source.config, config.block_size, num_blocks, config.seed)
    return BuiltModel(source.name, source.tokenizer, source.config, max_model_len, runner)


def _instantiate(source, config: EngineConfig, device, dtype, progress: bool) -> torch.nn.Module:
    cls = model_class(source.config)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):  # no memory and no random init until the real weights arrive
            model = cls(source.config)
    finally:
        torch.set_default_dtype(default_dtype)
    model = model.to_empty(device=device)
    model.tie_weights()  # to_empty gives each module its own tensor
    _rebuild_buffers(model, source.config, device)
    if config.load_format == "dummy":
        model.init_dummy(config.seed)
    else:
        with progress_bar(total=None, desc="Loading weights", unit="tensor", enable=progress) as bar:
            model.load_weights(_counted(source.weights(), bar))
    return model.eval()


def _rebuild_buffers(model: torch.nn.Module, config: ModelConfig, device) -> None:
    """The rotary table is a buffer, never materialised on the meta device: compute it now."""
    from engine.layers.rotary import RotaryEmbedding

    rotary = RotaryEmbedding(
        config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
    )
    table = rotary.cos_sin_cache.to(device)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.cos_sin_cache = table


def _counted(weights, bar):
    for item in weights:
        bar.update(1)
        yield item


def _max_model_len(config: EngineConfig, source) -> int:
    if config.max_model_len is None:
        return source.max_model_len
    if config.max_model_len > source.config.max_position_embeddings:
        raise ValueError(
            f"max_model_len {config.max_model_len} exceeds the model's maximum of "
            f"{source.config.max_position_embeddings} positions"
        )
    return config.max_model_len


def _num_kv_blocks(config, model_config: ModelConfig, device, dtype, max_model_len: int) -> int:
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    bytes_per_block = config.block_size * model_config.kv_bytes_per_token(dtype.itemsize)
    if config.kv_cache_gib is not None:
        budget = config.kv_cache_gib * _GIB
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        budget = total * config.gpu_memory_utilization - used - _activation_reserve(config)
    else:
        budget = DEFAULT_CPU_KV_CACHE_GIB * _GIB
    num_blocks = int(budget // bytes_per_block)
    min_blocks = (max_model_len + config.block_size - 1) // config.block_size
    if num_blocks < min_blocks:
        raise ValueError(
            f"the KV-cache budget holds {num_blocks} blocks of {config.block_size} tokens, fewer "
            f"than one sequence of max_model_len {max_model_len} needs ({min_blocks}): raise "
            "kv_cache_gib / gpu_memory_utilization or lower max_model_len"
        )
    return num_blocks


def _activation_reserve(config: EngineConfig) -> int:
    """Memory kept free for activations and CUDA graphs (a conservative fixed budget)."""
    return 2 * _GIB
