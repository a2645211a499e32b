"""The cos | sin table of every RoPE variant (engine/rope_config.py), computed as transformers
computes it (modeling_rope_utils: float32, the same op order), so positions rotate identically.

    table[p] = [cos(p * inv_freq) | sin(p * inv_freq)] * attention_factor    (rotary_dim wide)

Most variants have one inv_freq for every position. Two depend on the sequence length in
transformers, which recomputes them in each forward from the longest position it sees:
- longrope: the table has two halves, rows [0, max_position) with the short factors and rows
  [max_position, 2 * max_position) with the long ones. A sequence longer than
  original_max_position reads every position from the long half (the runner adds max_position to
  its positions: `longrope_row_offset`), and the scheduler recomputes its keys when it grows past
  that length, as transformers' Phi-3 drops its cache there (RopeConfig.regime_switch).
- dynamic: a paged cache keeps every key as it was rotated, so each position gets the frequencies
  it has when it is the newest token (what transformers uses for that token while decoding):
  theta * ((factor * (p + 1) / original) - (factor - 1)) ** (dim / (dim - 2)) past the original
  length, plain theta before it.
"""

from __future__ import annotations

import math

import torch

from hearth.engine.rope_config import RopeConfig


def cos_sin_table(rope: RopeConfig, head_dim: int, max_position: int) -> torch.Tensor:
    """(max_position, rotary_dim) float32: cos in the first half, sin in the second
    (longrope: (2 * max_position, rotary_dim), the short rows then the long rows)."""
    dim = rope.rotary_dim(head_dim)
    positions = torch.arange(max_position, dtype=torch.float32)
    if rope.kind == "dynamic":
        freqs = _dynamic_freqs(rope, dim, positions)
        scale = 1.0
    elif rope.kind == "longrope":
        scale = _longrope_attention_factor(rope)
        short = torch.outer(positions, _longrope_inv_freq(rope, dim, rope.short_factor))
        long = torch.outer(positions, _longrope_inv_freq(rope, dim, rope.long_factor))
        freqs = torch.cat([short, long])
    else:
        inv_freq, scale = inv_freq_and_scale(rope, dim)
        freqs = torch.outer(positions, inv_freq)  # (max_position, dim // 2)
    table = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    return table * scale if scale != 1.0 else table


def longrope_row_offset(rope: RopeConfig, max_position: int) -> int:
    """What a long-regime sequence adds to its positions to index `cos_sin_table` (0: none)."""
    return max_position if rope.regime_switch is not None else 0


def inv_freq_and_scale(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """(dim // 2,) inverse frequencies and the cos/sin scale of a position-independent kind."""
    inv_freq = _default_inv_freq(rope.theta, dim)
    if rope.freq_factors:  # llama.cpp's rope_freqs: each frequency divided by its factor
        factors = torch.tensor(rope.freq_factors, dtype=torch.float32)
        if factors.shape != inv_freq.shape:
            raise ValueError(f"rope_freqs has {factors.numel()} factors, the heads need "
                             f"{inv_freq.numel()}")
        inv_freq = inv_freq / factors
    if rope.kind == "default":
        return inv_freq, 1.0
    if rope.kind == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.kind == "llama3":
        return _llama3(rope, inv_freq), 1.0
    if rope.kind == "yarn":
        return _yarn(rope, dim)
    raise ValueError(f"rope kind {rope.kind!r} depends on the position")


def _default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3(rope: RopeConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    factor, low, high = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    old_len = rope.original_max_position
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_mid, mid, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    base, factor, original = rope.theta, rope.factor, rope.original_max_position
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = float(_yarn_mscale(factor, rope.mscale)
                                     / _yarn_mscale(factor, rope.mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers: prevent a singular ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1: extrapolate (high frequencies), 0: interpolate
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


def _longrope_inv_freq(rope: RopeConfig, dim: int, factors: tuple[float, ...]) -> torch.Tensor:
    ext = torch.tensor(factors, dtype=torch.float32)
    if ext.numel() != dim // 2:
        raise ValueError(f"longrope factors have {ext.numel()} entries, the heads need {dim // 2}")
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (ext * rope.theta**shape)


def _longrope_attention_factor(rope: RopeConfig) -> float:
    if rope.attention_factor is not None:
        return rope.attention_factor
    if rope.factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(rope.factor) / math.log(rope.original_max_position))


def _dynamic_freqs(rope: RopeConfig, dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(max_position, dim // 2) angles: row p with the theta of sequence length max(p + 1, orig)."""
    original, factor = rope.original_max_position, rope.factor
    seq_len = torch.clamp(positions + 1, min=original)  # (max_position,) float32
    base = rope.theta * ((factor * seq_len / original) - (factor - 1)) ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim  # (dim // 2,)
    inv_freq = 1.0 / (base[:, None] ** exponents[None, :])
    return positions[:, None] * inv_freq
