"""Write the new tokens' keys and values into the paged KV cache.

Cache layout (per layer, fixed by the engine), contiguous:

    k_cache, v_cache: (num_blocks, block_size, num_kv_heads, head_dim)

    block 0            block 1            ...
    [slot 0 .. bs-1]   [slot bs .. 2bs-1]
    slot = block_id * block_size + offset

`slot_mapping[t]` is the slot of new token t; a negative entry means "padding, write nothing"
(CUDA-graph batches are padded to a fixed size). One program copies one token's K and V rows.
"""

import torch
import triton
import triton.language as tl

_CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
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
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(value_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
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
) -> None:
    """Copy key/value (num_tokens, num_kv_heads, head_dim) into their cache slots, in place."""
    _check_write_args(key, value, k_cache, v_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    slot_mapping = slot_mapping.contiguous()
    _write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )  # fmt: skip


def write_kv_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Torch reference for write_kv (also the CPU path)."""
    _check_write_args(key, value, k_cache, v_cache, slot_mapping)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    # (num_blocks * block_size, num_kv_heads, head_dim)
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    flat_k[slots] = key[keep].to(k_cache.dtype)
    flat_v[slots] = value[keep].to(v_cache.dtype)
