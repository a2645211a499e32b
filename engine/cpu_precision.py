"""What `--dtype auto` means for `hearth serve` on a CPU: the fastest path that stays correct.

The exact CPU path dequantizes a GGUF to float32: decode reads 540 MB per token for the default
model (20.6 tok/s served on the 2-core box). With bfloat16 activations and the GGUF's Q4_0 / Q4_1
blocks kept (repacked exactly for torch's int4 GEMV, engine/quantization/cpu_int4.py) and the
file's 8-bit LM head as int8 rows (cpu_int8.py) a token reads the bytes llama.cpp reads: batch-1
decode 58 against 17.7 tok/s in float32 on a 2-core Zen 4 (2x on an AMX Xeon), prefill 1.2-2x.
Its quality cost, measured on the shipped held-out text
(appliance/tools/quantizer/calibration.txt): perplexity 17.86 against 17.81 in float32, +0.3%
(tests/test_cpu_precision.py holds it under 1%).

So when `EngineConfig.cpu_fast_path` is on (the server's default; the engine's own default stays
exact, for the token-identity tests), `dtype="auto"` on a CPU with a GGUF whose linears are all
Q4_0 / Q4_1 (other block types have no int4 GEMV on the CPU) becomes:
- with bf16 matrix instructions (AVX512-BF16, AMX): bfloat16 + kept blocks;
- with AVX2 + FMA or AVX-512 but no native bf16: a float32 model with kept blocks
  (`cpu_bf16_gemv` set too). With a C compiler the model builder gives it the native CPU
  kernels (kernels/cpu_native.py, EngineConfig.cpu_native): a decode step in one call, float32's
  perplexity, batch-1 decode 3.5-6x exact float32 on a 2-core AVX2 EPYC. Without one, its
  int4 GEMVs and int8 head take bf16 inputs through torch's kernels, fast only with bf16 inputs
  there, while every other bf16 op, prompts' GEMMs above all (7x slower than float32), is
  emulated: batch-1 decode 1.6-1.8x float32, perplexity +0.07%;
- below AVX2 (a scalar int4 loop) or on other architectures: float32.
`--dtype float32` always gives the exact path. docs/benchmarks.md has the measurements.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path

import torch

from hearth.engine.config import EngineConfig

logger = logging.getLogger(__name__)

INT4_GEMV_TYPES = frozenset({"Q4_0", "Q4_1"})
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
INT4_GEMV_FLAGS = (frozenset({"avx2", "fma"}), frozenset({"avx512f"}))  # any one set suffices


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux; elsewhere none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_has_bf16_matmul() -> bool:
    """AVX512-BF16 or AMX-BF16 (else bf16 is emulated and float32 stays the CPU default)."""
    return bool(BF16_FLAGS & cpu_flags())


def cpu_has_fast_int4_gemv() -> bool:
    """AVX2 + FMA or AVX-512: torch's int4 GEMV has vectorised kernels there."""
    flags = cpu_flags()
    return cpu_has_bf16_matmul() or any(need <= flags for need in INT4_GEMV_FLAGS)


def gguf_linear_types(path: str | Path) -> set[str]:
    """The block types of a GGUF's decoder linears (2-D `blk.*` weights)."""
    from hearth.engine.loader.gguf_file import read_gguf

    return {t.tensor_type.name for t in read_gguf(path).tensors
            if t.name.startswith("blk.") and len(t.shape) == 2}


def resolve_cpu_precision(config: EngineConfig, model_format: str, model_path: str | Path,
                          device_type: str) -> EngineConfig:
    """`config` with dtype and gguf_keep_quantized chosen for the CPU (see the module docstring)."""
    if (not config.cpu_fast_path or config.dtype != "auto" or device_type != "cpu"
            or config.load_format == "dummy" or model_format != "gguf"
            or config.tensor_parallel_size > 1):
        return config
    if not cpu_has_fast_int4_gemv():
        logger.info("CPU without AVX2 + FMA: float32 weights (the exact path)")
        return config
    types = gguf_linear_types(model_path)
    if not types or not types <= INT4_GEMV_TYPES:
        logger.info("GGUF linears in %s: float32 weights (the CPU int4 GEMV takes Q4_0 / Q4_1)",
                    ", ".join(sorted(types)) or "no block type")
        return config
    kinds = "/".join(sorted(types))
    if cpu_has_bf16_matmul():
        logger.info("CPU default: bfloat16 with the GGUF's %s blocks kept for the int4 GEMV (about "
                    "2x decode; --dtype float32 for the exact path)", kinds)
        return dataclasses.replace(config, dtype="bfloat16", gguf_keep_quantized=True)
    logger.info("CPU default: float32 with the GGUF's %s blocks kept (no bf16 matrix "
                "instructions): the native CPU kernels (built with the C compiler, or the wheel's "
                "prebuilt AVX2 build), else the "
                "int4 GEMV on bf16 inputs; --dtype float32 for the exact path", kinds)
    return dataclasses.replace(config, dtype="float32", gguf_keep_quantized=True,
                               cpu_bf16_gemv=True)


def precision_label(dtype: torch.dtype, kept_blocks: bool, gemv_dtype: torch.dtype | None,
                    native: bool = False) -> str:
    """The model's dtype, and how kept GGUF blocks multiply (each gives other numbers): e.g.
    "bfloat16+kept-blocks", "float32+kept-blocks+bf16-gemv", "float32+kept-blocks+native"."""
    name = str(dtype).removeprefix("torch.")
    if kept_blocks:
        name += "+kept-blocks"
        if native:
            name += "+native"
        elif gemv_dtype == torch.bfloat16:
            name += "+bf16-gemv"
    return name
