"""The LM head on a CPU at decode: 8-bit rows through torch's int8 weight-only GEMV
(`_weight_int8pack_mm`), for a GGUF whose output matrix the file holds in 8 bits or fewer. A
float32 model on the native CPU kernels takes the same rows (float32 scales) through
kernels/cpu_native.py's `i8_logits`, which also refines the top logits as `logits` does here.

At batch 1 the default model's tied LM head (49,152 x 576) is the largest single read of a decode
step: 56.6 MB in bfloat16, 5.2-5.6 ms of a 20 ms token on a 2-core Zen 4 (torch.mv; F.linear 3.1
ms), against 4 ms for all 120 int4 GEMVs of the decoder. The GGUF stores that matrix as Q8_0, and
llama.cpp reads those 8 bits. Held as int8 with one scale per output row (W8A16, absmax), the
same product reads 28 MB: 1.4 ms measured, at M = 1.

    w[n, k] ~= q[n, k] * scale[n]          q in -127..127, scale = max_k |w[n, k]| / 127

Per-row scales are coarser than Q8_0's per-32 scales, so this is a rounding, not the file's exact
blocks: its quality is held by tests/test_cpu_precision.py (held-out perplexity with every logit
computed through this head stays within 1% of float32).

The kernel returns bf16: logits of 15-20 land on steps of 0.06-0.125, so a near-tie of the
model (two tokens 0.08 apart in float32) can round to an exact tie, and greedy decoding then
takes the lower token id: on an AVX2 CPU the default model answered "What is the capital of
France?" with "L'Étoile, la Cité, ..." instead of "The capital of France is Paris." So `logits`
recomputes each row's top REFINED logits in float32 from the same int8 rows and float32 scales
(a (REFINED, K) gather and dot product a row, about 0.1 ms at batch 1 with the top-k): greedy
choices and the top of the distribution carry float32 precision; the long tail keeps bf16's,
where it moves a probability by far less than sampling's noise.

torch's kernel costs more per row than F.linear on the 16-bit weight (2.2 against 3.4 ms at M = 4,
4.4 against 3.9 at M = 8, 8.9 against 5.0 at M = 16), but it serves every decode batch up to
MAX_ROWS anyway: a row's logits from either kernel do not depend on the other rows, while
switching kernels by batch size would let one user's greedy answer change with the others'
traffic (tests/test_api_structured.py checks that it does not). MAX_ROWS is the int4 GEMV's bound
(cpu_int4.linear), the decoder's own batch-invariant range. Measured at batch 16: 211 against 224
tok/s with the 16-bit head (-6%); at batch 1: 16.5 against 20.3 ms a token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_ROWS = 32  # as cpu_int4.linear's GEMV: decode batches up to this many rows are batch-invariant
REFINED = 8  # each row's top logits recomputed in float32 (see above)
_ACT_DTYPES = (torch.bfloat16, torch.float16)
# GGUF's float types: an int8 copy would round what the file holds exactly. Every other type
# is a quantized block format of 8 bits or fewer a weight, which an int8 copy reads no more of.
_FLOAT_TYPES = frozenset({"F64", "F32", "F16", "BF16"})


@dataclass
class Int8Rows:
    weight: torch.Tensor  # (N, K) int8
    scales: torch.Tensor  # (N,) in the activation dtype
    exact_scales: torch.Tensor  # (N,) float32, for the refined logits


def supported(file_type: str | None, dtype: torch.dtype) -> bool:
    """An 8-bit-or-narrower GGUF head, a 16-bit kernel dtype, and torch's kernel present."""
    return (file_type is not None and file_type not in _FLOAT_TYPES and dtype in _ACT_DTYPES
            and hasattr(torch, "_weight_int8pack_mm"))


def quantize_rows(weight: torch.Tensor, chunk_rows: int = 2048,
                  dtype: torch.dtype | None = None) -> Int8Rows:
    """Absmax int8 per output row of a (N, K) float weight (rounded in float32), a chunk of rows
    at a time so each pass stays in cache (0.05 s for the default model's head, against 0.24-0.49
    s for whole-matrix passes: part of every cold start)."""
    scales = weight.abs().amax(dim=1).float().clamp(min=torch.finfo(torch.float32).tiny) / 127.0
    q = torch.empty(weight.shape, dtype=torch.int8)
    for start in range(0, weight.shape[0], chunk_rows):
        stop = start + chunk_rows
        rows = torch.div(weight[start:stop].float(), scales[start:stop, None])  # a new tensor
        q[start:stop] = rows.round_().clamp_(-127, 127).to(torch.int8)
    return Int8Rows(q, scales.to(dtype or weight.dtype), scales)


def dequantize(w: Int8Rows) -> torch.Tensor:
    """The weight the kernel multiplies by, in float32 (for tests)."""
    return w.weight.float() * w.scales.float()[:, None]


def dequantize_exact(w: Int8Rows) -> torch.Tensor:
    """The weight `logits` refines with (float32 scales), in float32 (for tests)."""
    return w.weight.float() * w.exact_scales[:, None]


def matmul(x: torch.Tensor, w: Int8Rows) -> torch.Tensor:
    """x (M, K) -> (M, N) in x's dtype; a float32 x goes through the kernel rounded to the
    scales' 16-bit dtype (EngineConfig.cpu_bf16_gemv)."""
    if x.dtype != w.scales.dtype:
        return torch._weight_int8pack_mm(x.to(w.scales.dtype).contiguous(), w.weight,
                                         w.scales).to(x.dtype)
    return torch._weight_int8pack_mm(x.contiguous(), w.weight, w.scales)


def logits(x: torch.Tensor, w: Int8Rows) -> torch.Tensor:
    """(M, N) float32 logits: the kernel's, with each row's top REFINED recomputed in float32
    (kernels/cpu_native.py's `i8_logits` does the same in one call for float32 scales)."""
    out = matmul(x, w).float()
    top = out.topk(min(REFINED, out.shape[1]), dim=1).indices  # (M, R)
    rows = w.weight[top].float()  # (M, R, K)
    exact = torch.bmm(rows, x.float().unsqueeze(2)).squeeze(2) * w.exact_scales[top]
    return out.scatter_(1, top, exact)
