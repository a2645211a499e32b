"""Weight quantization algorithms on plain tensors: RTN, GPTQ, and AWQ's scale and clip searches.

All work on one (fused) linear's float weight W (N outputs, K inputs), groups of `group_size`
consecutive inputs, and return a `QuantResult` of unsigned integers with per-group scales and zero
points; dequantized, W ≈ (q - zeros) * scales. Scales are rounded to float16 before the integers
are chosen, since checkpoints store them in float16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class QuantResult:
    q: torch.Tensor  # (N, K) int32 in [0, 2**bits)
    scales: torch.Tensor  # (N, G) float32 (float16 values)
    zeros: torch.Tensor  # (N, G) int32
    group_size: int

    def dequantize(self) -> torch.Tensor:
        g = torch.arange(self.q.shape[1], device=self.q.device) // self.group_size
        return (self.q - self.zeros[:, g]).float() * self.scales[:, g]


def quant_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of w (rows, group): min/max, as AutoGPTQ / AutoAWQ."""
    maxq = (1 << bits) - 1
    if sym:
        amax = w.abs().amax(dim=1).clamp(min=1e-8)
        scale = (2 * amax / maxq).half().float()
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        wmin, wmax = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
        scale = ((wmax - wmin).clamp(min=1e-8) / maxq).half().float()
        zero = torch.round(-wmin / scale).clamp(0, maxq)
    return scale, zero.to(torch.int32)


def quantize_column(w, scale, zero, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, (1 << bits) - 1).to(torch.int32)


def rtn(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> QuantResult:
    """Round to nearest, per group."""
    n, k = w.shape
    _check_groups(k, group_size)
    groups = w.float().reshape(n * k // group_size, group_size)
    scale, zero = quant_params(groups, bits, sym)
    q = quantize_column(groups, scale[:, None], zero[:, None], bits).reshape(n, k)
    g = k // group_size
    return QuantResult(q, scale.reshape(n, g), zero.reshape(n, g), group_size)


def fake_quant(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    return rtn(w, bits, group_size, sym).dequantize()


def gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, sym: bool,
         damp: float = 0.05, act_order: bool = False) -> QuantResult:
    """GPTQ (Frantar et al. 2022): quantize input columns left to right, pushing each column's
    rounding error onto the columns not yet quantized through the inverse Hessian's Cholesky
    factor. `hessian` (K, K) = 2/n sum x x^T over calibration inputs x. Groups start at multiples
    of group_size; their scales come from the weights as updated so far.

    `act_order`: columns go in order of decreasing Hessian diagonal (the inputs that matter most
    first, while the most columns are left to absorb their error), with static groups, as
    AutoGPTQ's desc_act + static_groups: each group's scale and zero come from the original
    weights, and groups stay k // group_size, so the checkpoint needs no g_idx reordering."""
    n, k = w.shape
    _check_groups(k, group_size)
    w = w.float().clone()
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k)
    q = torch.zeros(n, k, dtype=torch.int32)
    scales = torch.zeros(n, k // group_size)
    zeros = torch.zeros(n, k // group_size, dtype=torch.int32)
    perm = None
    if act_order:
        s, z = quant_params(w.reshape(n * k // group_size, group_size), bits, sym)
        scales, zeros = s.reshape(n, -1), z.reshape(n, -1)
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    block = max(group_size, 128 // group_size * group_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of small ops: thread hand-offs cost more than they save
    try:
        _gptq_blocks(w, hinv, (q, scales, zeros), bits, group_size, sym, block, perm)
    finally:
        torch.set_num_threads(threads)
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return QuantResult(q, scales, zeros, group_size)


def _gptq_blocks(w, hinv, out, bits: int, group_size: int, sym: bool, block: int,
                 perm: torch.Tensor | None) -> None:
    """Columns in w's order; with `perm` (act order), column j is input perm[j] and its group's
    scale and zero are already in `out`."""
    q, scales, zeros = out
    n, k = w.shape
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if perm is not None:
                g = int(perm[col]) // group_size
                s, z = scales[:, g], zeros[:, g]
            elif col % group_size == 0:  # the group lies inside this block (block % group == 0)
                s, z = quant_params(w1[:, i : i + group_size], bits, sym)
                scales[:, col // group_size], zeros[:, col // group_size] = s, z
            q[:, col] = quantize_column(w1[:, i], s, z, bits)
            err = (w1[:, i] - (q[:, col] - z).float() * s) / h1[i, i]
            w1[:, i:] -= err[:, None] * h1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]


def awq_scales(w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int,
               n_grid: int = 20) -> torch.Tensor:
    """AWQ (Lin et al. 2023) scale search: per input channel s = mean|x|^alpha (normalised), alpha
    on a grid in [0, 1), the one whose quantized (W * s) applied to x / s best reproduces x @ W^T.
    w: (N, K); x: (T, K) inputs. Returns s (K,); the caller folds 1 / s into the previous op."""
    x = x.float()
    w = w.float()
    x_mean = x.abs().mean(0)
    ref = x @ w.t()
    best, best_s = math.inf, torch.ones_like(x_mean)
    for i in range(n_grid):
        s = x_mean.pow(i / n_grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        wq = fake_quant(w * s, bits, group_size, sym=False) / s
        loss = (x @ wq.t() - ref).pow(2).mean().item()
        if loss < best:
            best, best_s = loss, s
    return best_s


def awq_clip(w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int, n_grid: int = 20,
             max_shrink: float = 0.5, chunk: int = 64) -> torch.Tensor:
    """AWQ clip search: per (output, group), shrink the clamp range max|w| by up to `max_shrink`
    where that lowers the group's output error on x. Returns w clamped (N, K)."""
    n, k = w.shape
    g = k // group_size
    x = x.float().reshape(-1, 1, g, group_size)  # (T, 1, G, gs)
    out = []
    for start in range(0, n, chunk):
        wc = w[start : start + chunk].float().reshape(-1, g, group_size)  # (n_c, G, gs)
        ref = (x * wc[None]).sum(-1)  # (T, n_c, G)
        org_max = wc.abs().amax(dim=-1, keepdim=True)  # (n_c, G, 1)
        best_err = torch.full(org_max.shape, math.inf)
        best_max = org_max.clone()
        for i in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i / n_grid)
            cur = torch.clamp(wc, -max_val, max_val).reshape(-1, k)
            q = fake_quant(cur, bits, group_size, sym=False).reshape(-1, g, group_size)
            err = ((x * q[None]).sum(-1) - ref).pow(2).mean(0)[..., None]  # (n_c, G, 1)
            better = err < best_err
            best_err[better], best_max[better] = err[better], max_val[better]
        out.append(torch.clamp(wc, -best_max, best_max).reshape(-1, k))
    return torch.cat(out)


def _check_groups(k: int, group_size: int) -> None:
    if k % group_size:
        raise ValueError(
            f"group size {group_size} does not divide the layer's {k} inputs; pick a group size "
            f"that divides every layer's input size (for the default model, hidden 576: 64 or 32)"
        )
