"""Write the new tokens' keys and values into the paged KV cache.

Cache layout (per layer, fixed by the engine), contiguous:

    k_cache, v_cache: (num_blocks, block_size, num_kv_heads, head_dim)

    block 0            block 1            ...
    [slot 0 .. bs-1]   [slot bs .. 2bs-1]
    slot = block_id * block_size + offset

`slot_mapping[t]` is the slot of new token t; a negative entry means "padding, write nothing"
(CUDA-graph batches are padded to a fixed size). One program copies one token's K and V rows.

An fp8 cache (torch.float8_e4m3fn) stores each value quantized with its layer's scale, saturated
to e4m3's finite range, rounded to nearest even; readers multiply by the scale:

    stored = e4m3(clamp(x / scale, -448, 448))        read = float(stored) * scale

The scales (KVScales) are float32 tensors read by the kernels at run time, so a CUDA graph
replays whatever they hold. Every kernel that reads or writes an fp8 cache takes them.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
_CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, FP8_DTYPE)
_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class KVScales:
    """Dequantization scales of one layer's fp8 K and V cache: float32 tensors of one element on
    the cache's device (vLLM's k_scale / v_scale)."""

    k: torch.Tensor
    v: torch.Tensor


@triton.jit
def quantize_fp8(x, scale):
    """x / scale in fp32 (IEEE division, as torch), saturated at +-448, rounded to e4m3."""
    y = tl.math.div_rn(x.to(tl.float32), scale)
    return tl.clamp(y, -448.0, 448.0).to(tl.float8e4nv)


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_scale_ptr, v_scale_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, KV_FP8: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:
        return
    heads = tl.arange(0, BLOCK_H)[:, None]  # (BLOCK_H, 1)
    dims = tl.arange(0, BLOCK_D)[None, :]  # (1, BLOCK_D)
    mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM)
    # A cache slot is one contiguous (num_kv_heads, head_dim) row.
    dst = slot * (NUM_KV_HEADS * HEAD_DIM) + heads * HEAD_DIM + dims
    k = tl.load(key_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask)
    v = tl.load(value_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
    if KV_FP8:
        k = quantize_fp8(k, tl.load(k_scale_ptr))
        v = quantize_fp8(v, tl.load(v_scale_ptr))
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def check_cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """Raise ValueError unless k_cache/v_cache form a valid contiguous cache pair."""
    if k_cache.dim() != 4:
        raise ValueError(
            "k_cache must be (num_blocks, block_size, num_kv_heads, head_dim), "
            f"got shape {tuple(k_cache.shape)}"
        )
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(
            f"v_cache {tuple(v_cache.shape)} {v_cache.dtype} must match "
            f"k_cache {tuple(k_cache.shape)} {k_cache.dtype}"
        )
    if k_cache.dtype not in _CACHE_DTYPES:
        raise ValueError(f"KV cache dtype must be one of {_CACHE_DTYPES}, got {k_cache.dtype}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    if k_cache.device != v_cache.device:
        raise ValueError("k_cache and v_cache must be on the same device")


def check_scales(scales: KVScales | None, k_cache: torch.Tensor):
    """-> (k_scale, v_scale) for a kernel: an fp8 cache needs scales, another cache takes none
    (the cache itself then stands in for the pointers, which the kernel never reads)."""
    if k_cache.dtype != FP8_DTYPE:
        if scales is not None:
            raise ValueError(f"scales apply only to an fp8 cache, not to {k_cache.dtype}")
        return k_cache, k_cache
    if scales is None:
        raise ValueError("an fp8 KV cache needs its scales (KVScales)")
    for name, t in (("scales.k", scales.k), ("scales.v", scales.v)):
        if t.dtype != torch.float32 or t.numel() != 1 or t.device != k_cache.device:
            raise ValueError(f"{name} must be one float32 value on {k_cache.device}, got "
                             f"{tuple(t.shape)} {t.dtype} on {t.device}")
    return scales.k, scales.v


def check_compute_dtype(query: torch.Tensor, k_cache: torch.Tensor) -> None:
    """The query is in the cache dtype, or in any float dtype when the cache is fp8."""
    if k_cache.dtype == FP8_DTYPE:
        ok = query.dtype in _COMPUTE_DTYPES
    else:
        ok = query.dtype == k_cache.dtype
    if not ok:
        raise ValueError(f"query dtype {query.dtype} must match the cache dtype {k_cache.dtype}")


def dequantize(cache_rows: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Cache rows in float32 as attention reads them: times the scale for an fp8 cache."""
    if cache_rows.dtype == FP8_DTYPE:
        return cache_rows.float() * scale
    return cache_rows.float()


def _raw(t: torch.Tensor) -> torch.Tensor:
    """fp8 tensors through a uint8 view: torch's indexing ops do not all take float8 on CUDA."""
    return t.view(torch.uint8) if t.dtype == FP8_DTYPE else t


def _check_write_args(key, value, k_cache, v_cache, slot_mapping) -> None:
    check_cache_pair(k_cache, v_cache)
    _, _, num_kv_heads, head_dim = k_cache.shape
    for name, t in (("key", key), ("value", value)):
        if t.dim() != 3 or t.shape[1:] != (num_kv_heads, head_dim):
            raise ValueError(
                f"{name} must be (num_tokens, {num_kv_heads}, {head_dim}), got {tuple(t.shape)}"
            )
        if t.stride(2) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
        if t.device != k_cache.device:
            raise ValueError(f"{name} must be on {k_cache.device}, got {t.device}")
    if value.shape[0] != key.shape[0]:
        raise ValueError(f"key has {key.shape[0]} tokens but value has {value.shape[0]}")
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(f"slot_mapping must be ({key.shape[0]},), got {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    scales: KVScales | None = None,
) -> None:
    """Copy key/value (num_tokens, num_kv_heads, head_dim) into their cache slots, in place
    (quantized with `scales` into an fp8 cache)."""
    _check_write_args(key, value, k_cache, v_cache, slot_mapping)
    k_scale, v_scale = check_scales(scales, k_cache)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    slot_mapping = slot_mapping.contiguous()
    _write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        KV_FP8=k_cache.dtype == FP8_DTYPE,
    )


def write_kv_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    scales: KVScales | None = None,
) -> None:
    """Torch reference for write_kv."""
    _check_write_args(key, value, k_cache, v_cache, slot_mapping)
    k_scale, v_scale = check_scales(scales, k_cache)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    for rows, cache, scale in ((key[keep], k_cache, k_scale), (value[keep], v_cache, v_scale)):
        if cache.dtype == FP8_DTYPE:
            rows = (rows.float() / scale).clamp(-FP8_MAX, FP8_MAX)
        # (num_blocks * block_size, num_kv_heads, head_dim)
        _raw(cache).view(-1, *cache.shape[2:])[slots] = _raw(rows.to(cache.dtype))
