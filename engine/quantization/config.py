"""QuantConfig: how a checkpoint's linear weights are quantized, read from config.json or a GGUF.

One frozen dataclass for every format, so the model and the loader never look at raw JSON:

    method               where it comes from                         tensors per linear
    "awq"                quantization_config.quant_method == "awq"    qweight, qzeros, scales
    "gptq"               quant_method == "gptq"                       qweight, qzeros, scales, g_idx
    "compressed-tensors" quant_method "compressed-tensors"          weight_packed, weight_scale,
                         (format "pack-quantized", W4A16 / W8A16)   weight_zero_point, weight_shape
    "gguf"               a GGUF opened with gguf_keep_quantized        qweight (raw blocks)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

METHODS = ("awq", "gptq", "compressed-tensors", "gguf")


class UnsupportedQuantization(ValueError):
    """A checkpoint's quantization_config asks for something Hearth cannot run."""


@dataclass(frozen=True)
class QuantConfig:
    method: str
    bits: int = 4
    group_size: int | None = 128  # None: one group per output channel (per-channel scales)
    sym: bool = True  # no stored zero points (GPTQ sym, compressed-tensors symmetric)
    desc_act: bool = False  # GPTQ act-order: g_idx is a permutation, not k // group_size
    gptq_v2: bool = False  # GPTQ checkpoint_format "gptq_v2": zeros stored without the -1 offset
    ignore: tuple[str, ...] = ()  # module names (or "re:" patterns) left in float
    gguf_types: dict[str, str] = field(default_factory=dict)  # GGUF: HF module name -> "Q4_1"
    lm_head_type: str | None = None  # GGUF: the output matrix's type in the file (tied: token_embd)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UnsupportedQuantization(
                f"quantization method {self.method!r} is not supported; supported: "
                f"{', '.join(METHODS)}"
            )
        if self.method != "gguf" and self.bits not in (4, 8):
            raise UnsupportedQuantization(f"{self.method}: {self.bits}-bit weights are not "
                                          "supported; use 4 or 8 bits")
        if self.method == "awq" and self.bits != 4:
            raise UnsupportedQuantization("awq: only 4-bit GEMM checkpoints are supported")
        if self.group_size is not None and self.group_size < 1:
            raise UnsupportedQuantization(f"group_size must be positive, got {self.group_size}")

    def is_ignored(self, module_name: str) -> bool:
        """True when `module_name` (HF naming, e.g. model.layers.0.self_attn.q_proj) stays float."""
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                if re.fullmatch(pattern[3:], module_name):
                    return True
            elif module_name == pattern or module_name.endswith("." + pattern):
                return True
        return False


def parse_quantization_config(cfg: dict, where: str) -> QuantConfig | None:
    """config.json's `quantization_config` → QuantConfig (None when the checkpoint is float)."""
    qc = cfg.get("quantization_config") or cfg.get("compression_config")
    if not qc:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method == "awq":
        return _awq(qc, where)
    if method in ("gptq", "gptqmodel"):
        return _gptq(qc, where)
    if method == "compressed-tensors":
        return _compressed_tensors(qc, where)
    raise UnsupportedQuantization(
        f"{where}: quantization method {method!r} is not supported; Hearth runs awq (GEMM), gptq "
        "and compressed-tensors pack-quantized (W4A16/W8A16) checkpoints, and GGUF files"
    )


def _group(value, where: str) -> int | None:
    if value in (None, -1, 0):
        return None
    return int(value)


def _awq(qc: dict, where: str) -> QuantConfig:
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise UnsupportedQuantization(
            f"{where}: AWQ version {version!r} is not supported; re-export with version 'gemm'"
        )
    if not qc.get("zero_point", True):
        raise UnsupportedQuantization(f"{where}: AWQ without zero points is not supported")
    ignore = tuple(qc.get("modules_to_not_convert") or ())
    return QuantConfig("awq", int(qc.get("bits", qc.get("w_bit", 4))),
                       _group(qc.get("group_size", qc.get("q_group_size", 128)), where),
                       sym=False, ignore=ignore)


def _gptq(qc: dict, where: str) -> QuantConfig:
    fmt = str(qc.get("checkpoint_format", qc.get("format", "gptq"))).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise UnsupportedQuantization(
            f"{where}: GPTQ checkpoint_format {fmt!r} is not supported; expected gptq or gptq_v2"
        )
    if qc.get("dynamic"):
        raise UnsupportedQuantization(f"{where}: GPTQ 'dynamic' per-module overrides are not "
                                      "supported")
    return QuantConfig("gptq", int(qc.get("bits", 4)), _group(qc.get("group_size", 128), where),
                       sym=bool(qc.get("sym", True)), desc_act=bool(qc.get("desc_act", False)),
                       gptq_v2=fmt == "gptq_v2")


def _compressed_tensors(qc: dict, where: str) -> QuantConfig:
    fmt = qc.get("format")
    if fmt != "pack-quantized":
        raise UnsupportedQuantization(
            f"{where}: compressed-tensors format {fmt!r} is not supported; Hearth reads "
            "'pack-quantized' (W4A16 / W8A16 integer weights)"
        )
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise UnsupportedQuantization(f"{where}: exactly one compressed-tensors config group is "
                                      f"supported, found {len(groups)}")
    group = groups[0]
    weights = group.get("weights") or {}
    if group.get("input_activations") or weights.get("type", "int") != "int":
        raise UnsupportedQuantization(f"{where}: only weight-only integer quantization (W4A16 / "
                                      "W8A16) is supported")
    strategy = weights.get("strategy", "group")
    if strategy not in ("group", "channel"):
        raise UnsupportedQuantization(f"{where}: weight strategy {strategy!r} is not supported; "
                                      "expected group or channel")
    if weights.get("actorder") not in (None, False, "weight", "static"):
        raise UnsupportedQuantization(f"{where}: actorder {weights.get('actorder')!r} needs "
                                      "g_idx, which is not supported")
    size = weights.get("group_size") if strategy == "group" else None
    return QuantConfig("compressed-tensors", int(weights.get("num_bits", 4)), _group(size, where),
                       sym=bool(weights.get("symmetric", True)),
                       ignore=tuple(qc.get("ignore") or ()))
