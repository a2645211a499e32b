"""The paged KV cache's storage: its dtype, the per-layer tensors, and the fp8 scales.

    kv_cache_dtype  "auto"             the model dtype (bf16 on CUDA, float32 on CPU)
                    "fp8", "fp8_e4m3"  torch.float8_e4m3fn, CUDA only: one byte per value, so the
                                       same memory budget holds twice the blocks of bf16

Per layer (the layout of engine/attention.py):

    key, value: (num_blocks, block_size, num_kv_heads, head_dim)
    scales:     KVScales(k, v), float32 scalars on the device; None unless the cache is fp8

Scale choice: 1.0 for every layer. e4m3's relative precision is the same (3 mantissa bits)
everywhere in its normal range 2^-6 .. 448, so a scale only helps values that leave that range;
the keys and values of Llama-family models are O(1)..O(10), and the kernels saturate anything
beyond +-448 instead of overflowing. Calibrating from the memory-profiling pass was rejected: it
runs on placeholder token ids, whose K/V say nothing about real prompts. The scales are tensors
that the kernels read at run time (never baked into a compiled kernel or a CUDA graph), so
calibrated values, such as a checkpoint's k_scale / v_scale, can be filled in per layer later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from hearth.engine.config import fp8_needs_cuda_message
from hearth.engine.model_config import ModelConfig

if TYPE_CHECKING:  # kernels/ imports triton, which a CPU-only install may lack
    from hearth.kernels.kv_write import KVScales

FP8_DTYPE = torch.float8_e4m3fn


def resolve_kv_cache_dtype(
    kv_cache_dtype: str, model_dtype: torch.dtype, device: torch.device
) -> torch.dtype:
    """The cache tensors' dtype; ValueError where fp8 cannot run (CPU, GPUs before Ada/Hopper)."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError(fp8_needs_cuda_message(kv_cache_dtype))
    return FP8_DTYPE


@dataclass(frozen=True)
class LayerKVCache:
    """One layer's cache. It unpacks as (key, value), so a backend that needs no scales (the
    torch reference on CPU) reads it as the plain pair."""

    key: torch.Tensor
    value: torch.Tensor
    scales: KVScales | None = None

    def __iter__(self):
        return iter((self.key, self.value))

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Blocks src[i] -> dst[i] (copy-on-write), through uint8 views: torch's indexing does
        not take float8 on every device."""
        for cache in (self.key, self.value):
            raw = cache.view(torch.uint8) if cache.dtype == FP8_DTYPE else cache
            raw[dst] = raw[src]


def allocate_kv_cache(
    config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[LayerKVCache]:
    """Zeroed caches for every layer (fp8 zeros are the byte 0), fp8 ones with scales of 1.0."""
    shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
    if dtype == FP8_DTYPE:
        from hearth.kernels.kv_write import KVScales  # fp8 runs on CUDA only, where triton is
    caches = []
    for _ in range(config.num_layers):
        if dtype == FP8_DTYPE:
            key, value = (torch.zeros(shape, dtype=torch.uint8, device=device).view(dtype)
                          for _ in range(2))
            ones = torch.ones(2, dtype=torch.float32, device=device)
            caches.append(LayerKVCache(key, value, KVScales(ones[0], ones[1])))
        else:
            key, value = (_zeros(shape, dtype, device) for _ in range(2))
            caches.append(LayerKVCache(key, value))
    return caches


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """On the CPU through numpy's calloc: the OS hands out zero pages as they are first touched,
    so a cache of gigabytes costs nothing at start-up (torch.zeros writes every byte: 0.47 s of
    the default model's cold start) and only the blocks in use take memory."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)
