"""RopeConfig: how a model rotates queries and keys, read from config.json or GGUF metadata.

One typed record for every RoPE variant Hearth runs (the math is in engine/layers/rope_scaling.py):

    kind      what changes                                  where it comes from
    default   nothing                                       every model
    linear    positions divided by `factor`                 HF rope_scaling, GGUF scaling.type
    dynamic   NTK: theta grows with the sequence length     HF only (llama.cpp has no such type)
    yarn      per-dimension blend + attention factor        HF (Qwen2.5/3 long context), GGUF
    llama3    low frequencies divided by `factor`, smooth   HF; GGUF as freq_factors (rope_freqs)
    longrope  per-dimension short/long factors (Phi-3 su)   HF; GGUF rope_factors_short/long

No torch here: the loaders and the scheduling core may import it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ROPE_KINDS = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    # the pretraining context: yarn's correction range, llama3's wavelengths, longrope's switch
    # point, dynamic's growth start
    original_max_position: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    truncate: bool = True  # yarn: round the correction range to whole dimensions
    mscale: float | None = None  # yarn (DeepSeek-style attention factor)
    mscale_all_dim: float | None = None  # yarn
    attention_factor: float | None = None  # yarn / longrope: cos and sin scaled (None: derived)
    short_factor: tuple[float, ...] = ()  # longrope, sequences of <= original_max_position
    long_factor: tuple[float, ...] = ()  # longrope, longer sequences (every position)
    freq_factors: tuple[float, ...] = ()  # GGUF rope_freqs.weight: inv_freq[i] / freq_factors[i]
    partial_rotary_factor: float = 1.0  # Phi-4-mini: only the first 75% of each head rotates

    def __post_init__(self) -> None:
        if self.kind not in ROPE_KINDS:
            raise ValueError(
                f"unsupported rope scaling type {self.kind!r}; supported: {', '.join(ROPE_KINDS)}"
            )
        needs_original = ("yarn", "llama3", "longrope", "dynamic")
        if self.kind in needs_original and not self.original_max_position:
            raise ValueError(f"rope scaling {self.kind!r} needs original_max_position_embeddings")
        if self.kind == "longrope" and not (self.short_factor and self.long_factor):
            raise ValueError("longrope scaling needs short_factor and long_factor")

    def rotary_dim(self, head_dim: int) -> int:
        return int(head_dim * self.partial_rotary_factor)

    @property
    def regime_switch(self) -> int | None:
        """longrope: the sequence length past which every position of a sequence rotates with the
        long factors (its cached keys are computed again when it grows past it); None otherwise.

        Transformers' Phi-3 picks the factors per forward pass from the longest position in it, and
        drops its KV cache to recompute the whole sequence once generation passes this length;
        engine/scheduler.py does the same per sequence (`Sequence.rope_long`)."""
        return self.original_max_position if self.kind == "longrope" else None

    def replace(self, **changes: Any) -> RopeConfig:
        return dataclasses.replace(self, **changes)


_KIND_ALIASES = {"su": "longrope", "mrope": "default"}


def rope_from_hf(params: dict[str, Any] | None, cfg: dict[str, Any]) -> RopeConfig:
    """A RopeConfig from one HF rope dict (`rope_scaling` of transformers 4, `rope_parameters`
    of 5, or one per-layer-type entry of it) and the surrounding config.json."""
    params = dict(params or {})
    kind = params.get("rope_type") or params.get("type") or "default"
    kind = _KIND_ALIASES.get(kind, kind)
    theta = params.get("rope_theta") or cfg.get("rope_theta") or 10000.0
    # Phi-3 keeps original_max_position_embeddings outside the rope dict, and transformers
    # prefers that value (modeling_rope_utils.standardize_rope_params)
    original = cfg.get("original_max_position_embeddings") or params.get(
        "original_max_position_embeddings")
    if kind == "dynamic":  # transformers grows theta past max_position_embeddings itself
        original = cfg.get("max_position_embeddings")
    elif kind in ("yarn", "llama3", "longrope") and not original:
        original = cfg.get("max_position_embeddings")
    factor = params.get("factor")
    if factor is None and kind in ("yarn", "longrope") and original:
        factor = cfg.get("max_position_embeddings", original) / original
    partial = params.get("partial_rotary_factor") or cfg.get("partial_rotary_factor") or 1.0
    optional = {key: params[key] for key in ("low_freq_factor", "high_freq_factor",
                                             "attention_factor", "mscale", "mscale_all_dim",
                                             "truncate")
                if params.get(key) is not None}
    for key in ("beta_fast", "beta_slow"):  # transformers: `get(key) or default`
        if params.get(key):
            optional[key] = float(params[key])
    return RopeConfig(
        theta=float(theta), kind=kind, factor=float(factor if factor is not None else 1.0),
        original_max_position=int(original) if original else None,
        short_factor=tuple(params.get("short_factor") or ()),
        long_factor=tuple(params.get("long_factor") or ()),
        partial_rotary_factor=float(partial), **optional,
    )
