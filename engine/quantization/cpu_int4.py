"""4-bit weights on CPU through torch's packed-int4 GEMV (`_weight_int4pack_mm_for_cpu`): GGUF
Q4_0 / Q4_1 blocks (`pack_gguf`) and the int layout of AWQ / GPTQ / compressed-tensors
(`pack_int`, int_layout.py; w = (q - z) s → scale s, zero (8 - z) s).

Decode on a CPU is bound by memory bandwidth: a float32 weight costs 8x the bytes of a 4-bit one.
torch ships a vectorised int4 weight-only matmul for CPUs (bf16/fp16 activations, group-wise
scale and zero point), which reads the weights at their packed size:

    w[n, k] = (q[n, k] - 8) * scale[k // G, n] + zero[k // G, n]          q in 0..15, G = 32

llama.cpp's blocks map onto it exactly, group for group:
    Q4_0: w = (q - 8) * d            → scale = d, zero = 0
    Q4_1: w = q * d + m              → scale = d, zero = m + 8 d
(d, m are float16 in the file; scale and zero are held in the activation dtype, so bf16 rounds
them to 8 significant bits — far below the 4-bit quantization step.)

The packed layout is torch's and depends on the CPU torch dispatches to (int4mm_kernel.cpp):
rows in tiles of T (64 on AVX-512, 32 on AVX2); byte [tile, k, j] holds q[T tile + j, k] in its
low nibble and q[T tile + T/2 + j, k] in its high nibble (older scalar builds paired adjacent
rows instead).
`_layout()` packs a probe once and keeps whichever reading gives it back (none: the int4 path is
refused and the weights stay dequantized). `dequantize` reads it back for large batches
(prefill), where a dense matmul beats the GEMV: in bf16 on a CPU with bf16 matrix instructions,
in float32 elsewhere (on an AVX2-only EPYC a bf16 GEMM of 512 rows took 109 ms, float32 16 ms
plus 5 ms to dequantize, for the default model's gate_up). tests/test_cpu_int4.py checks the
read-back against torch on the machine it runs on.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hearth.engine.cpu_precision import cpu_has_bf16_matmul
from hearth.engine.quantization import int_layout
from hearth.engine.quantization.gguf_blocks import BLOCKS, f16, nibbles

TYPES = ("Q4_0", "Q4_1")
GROUP = 32
_TILE = 64  # output rows per packed tile
_ACT_DTYPES = (torch.bfloat16, torch.float16)


@dataclass
class Int4Weight:
    packed: torch.Tensor  # (N, K // 2) uint8, torch's CPU int4 layout
    scale_zero: torch.Tensor  # (K // group, N, 2) in the activation dtype
    out_features: int
    in_features: int
    group: int = GROUP


def _unpack_halves(packed: torch.Tensor, n: int, k: int, tile: int) -> torch.Tensor:
    """Tiles of `tile` rows; byte [t, k, j] holds row tile t + j low, row tile t + tile / 2 + j
    high."""
    half = tile // 2
    tiles = packed.view(n // tile, k, half)
    q = torch.stack((tiles & 0x0F, tiles >> 4), dim=1)  # (tiles, 2, K, half): rows t + h half + j
    return q.permute(0, 1, 3, 2).reshape(n, k)


def _unpack_pairs(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Tiles of 32 rows; byte [t, k, j] holds row 32 t + 2 j low, row 32 t + 2 j + 1 high."""
    tiles = packed.view(n // 32, k, 16)
    q = torch.stack((tiles & 0x0F, tiles >> 4), dim=-1)  # (tiles, K, 16, 2): rows 32t + 2j + h
    return q.reshape(n // 32, k, 32).permute(0, 2, 1).reshape(n, k)


_LAYOUTS = {
    "halves-64": functools.partial(_unpack_halves, tile=64),  # AVX-512
    "halves-32": functools.partial(_unpack_halves, tile=32),  # AVX2 (torch 2.13)
    "pairs-32": _unpack_pairs,  # torch's scalar fallback in earlier releases
}


@functools.cache
def _layout() -> str | None:
    """Which of the known layouts torch packs in on this CPU (None: torch lacks the kernel or
    packs in a layout we cannot read, so the int4 path is refused)."""
    if not (hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
            and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")):
        return None
    n, k = 2 * _TILE, 2 * GROUP
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    if packed.numel() * 2 != n * k:
        return None
    for name, read in _LAYOUTS.items():
        if torch.equal(read(packed.view(torch.uint8), n, k).to(torch.int32), q):
            return name
    return None


def supported(qtype: str, out_features: int, in_features: int, dtype: torch.dtype) -> bool:
    """Whether this weight can take the int4 path (and torch has the kernel)."""
    return (qtype in TYPES and dtype in _ACT_DTYPES and out_features % _TILE == 0
            and in_features % GROUP == 0 and _layout() is not None)


INT_GROUPS = (32, 64, 128, 256)  # the group sizes torch's kernel takes


def supported_int(bits: int, group_size: int | None, out_features: int, in_features: int,
                  dtype: torch.dtype) -> bool:
    """Whether an int-layout weight (trivial g_idx: group_size set) can take the int4 path."""
    return (bits == 4 and group_size in INT_GROUPS and dtype in _ACT_DTYPES
            and out_features % _TILE == 0 and in_features % group_size == 0
            and _layout() is not None)


def pack_int(qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int,
             dtype: torch.dtype) -> Int4Weight:
    """Int layout (qweight (K // 8, N) int32, zeros and scales (K // group, N)) → Int4Weight:
    scale s, zero (8 - z) s, so that (q - 8) s + (8 - z) s = (q - z) s."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    if not supported_int(4, group_size, n, k, dtype):
        raise ValueError(f"int4 {n}x{k}, group {group_size}, in {dtype} cannot take the CPU int4 "
                         f"path (needs groups of {INT_GROUPS}, rows a multiple of {_TILE}, "
                         f"bf16/fp16)")
    q = int_layout.unpack(qweight, 4, dim=0).t().contiguous().to(torch.int32)  # (N, K)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    s = scales.float()
    scale_zero = torch.stack([s, (8.0 - zeros.float()) * s], dim=-1).to(dtype).contiguous()
    return Int4Weight(packed, scale_zero, n, k, group_size)


def pack_gguf(raw: torch.Tensor, qtype: str, in_features: int, dtype: torch.dtype) -> Int4Weight:
    """(N, row_bytes) uint8 Q4_0 / Q4_1 rows → Int4Weight (same bytes per weight as the file)."""
    n = raw.shape[0]
    if not supported(qtype, n, in_features, dtype):
        raise ValueError(f"{qtype} {n}x{in_features} in {dtype} cannot take the CPU int4 path "
                         f"(needs Q4_0/Q4_1, rows a multiple of {_TILE}, bf16/fp16)")
    size = BLOCKS[qtype][1]
    blocks = raw.reshape(n, in_features // GROUP, size)
    d = f16(blocks[..., 0:2])[..., 0]  # (N, K // 32)
    if qtype == "Q4_0":
        qs, zero = blocks[..., 2:], torch.zeros_like(d)
    else:
        m = f16(blocks[..., 2:4])[..., 0]
        qs, zero = blocks[..., 4:], m + 8.0 * d
    q = nibbles(qs.reshape(-1, 16), 16).reshape(n, in_features).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    scale_zero = torch.stack([d.t(), zero.t()], dim=-1).to(dtype).contiguous()
    return Int4Weight(packed, scale_zero, n, in_features)


def matmul(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """x (M, K) @ W^T → (M, N), x in the dtype the weight was packed for."""
    if x.dim() != 2 or x.shape[1] != w.in_features or x.dtype != w.scale_zero.dtype:
        raise ValueError(f"x must be (M, {w.in_features}) {w.scale_zero.dtype}; got "
                         f"{tuple(x.shape)} {x.dtype}")
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), w.packed, w.group,
                                                      w.scale_zero)


def unpack(w: Int4Weight) -> torch.Tensor:
    """The 4-bit values q (N, K) uint8, read back from the packed layout."""
    layout = _layout()
    if layout is None:
        raise RuntimeError("torch's CPU int4 layout is unknown on this machine")
    return _LAYOUTS[layout](w.packed.view(torch.uint8), w.out_features, w.in_features)


def dequantize(w: Int4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W (N, K) in `dtype` (default: the activation dtype): q * scale + (zero - 8 scale),
    computed in float32."""
    n, k = w.out_features, w.in_features
    sz = w.scale_zero.float().transpose(0, 1).contiguous()  # (N, K // group, 2)
    scale = sz[..., 0:1]
    offset = sz[..., 1:2] - 8.0 * scale
    q = unpack(w).view(n, k // w.group, w.group).to(torch.float32)
    return torch.addcmul(offset, q, scale).view(n, k).to(dtype or w.scale_zero.dtype)


def linear(x: torch.Tensor, w: Int4Weight, gemv_max_rows: int = 32) -> torch.Tensor:
    """The engine's entry: the int4 GEMV for a few rows (decode), dequantize + dense matmul for
    many (prefill), where compute rather than weight bytes dominates. A float32 `x` on a weight
    packed for bf16 (EngineConfig.cpu_bf16_gemv) goes to the GEMV rounded to bf16, and its
    prompts stay in float32."""
    gemv_dtype = w.scale_zero.dtype
    if x.shape[0] <= gemv_max_rows:
        if x.dtype != gemv_dtype:
            return matmul(x.to(gemv_dtype), w).to(x.dtype)
        return matmul(x, w)
    if x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and not cpu_has_bf16_matmul()):
        return F.linear(x.float(), dequantize(w, torch.float32)).to(x.dtype)  # no-ops in float32
    return F.linear(x, dequantize(w))
