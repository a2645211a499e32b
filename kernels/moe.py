"""Fused mixture-of-experts MLP (SiLU gating: Qwen3-MoE, Mixtral):

    out[t] = sum_k w[t, k] * down_e(silu(gate_e(x[t])) * up_e(x[t])),  e = ids[t, k]

Three steps, two of them one grouped-GEMM kernel each:

    align       pairs p = t * K + k sorted by expert into blocks of BLOCK_M rows, each block owned
                by one expert (padding rows hold the sentinel P); on the device, no host sync, so
                it runs inside a CUDA graph. Few pairs (decode): one pair a block, nothing sorted.
    gate_up     inter[p] = x[p // K] @ w13[e]^T                  (P, 2I)   grouped GEMM
    act         silu(gate) * up                                   (P, I)    kernels/fused.py
    down        y[p] = w[p] * (act[p] @ w2[e]^T)                  (P, H)    grouped GEMM, the
                                                                            weight in the epilogue
    sum         out[t] = sum_k y[t * K + k] in fp32               (T, H)

    sorted rows:  | e0 e0 e0 pad | e3 e3 pad pad | e7 ... |     block b -> block_expert[b]
                  '-- BLOCK_M --'

Grid of a grouped GEMM: (blocks, N tiles); a block whose expert is -1 (past the last used block)
returns at once. The block count is an upper bound fixed by (P, E, BLOCK_M), so a captured graph
replays for any routing. The reference `fused_moe_ref` loops over experts in torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_UNSORTED_MAX_PAIRS = 16  # up to here (batch 1-2 at top-8) one pair a block: no sort at all


@dataclass(frozen=True)
class ExpertBlocks:
    """Pairs grouped by expert: sorted_pairs (num_blocks * block_m,) pair ids, num_pairs for
    padding; block_expert (num_blocks,) expert of each block, -1 past the used blocks."""

    sorted_pairs: torch.Tensor
    block_expert: torch.Tensor
    block_m: int


def align_pairs(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertBlocks:
    """Group the (T, K) expert choices into expert-owned blocks of block_m rows (device ops)."""
    flat = topk_ids.reshape(-1).to(torch.int64)  # (P,) expert of pair p
    num_pairs = flat.numel()
    device = flat.device
    if num_pairs <= _UNSORTED_MAX_PAIRS:  # one pair a block
        sorted_pairs = torch.full((num_pairs, block_m), num_pairs, dtype=torch.int32,
                                  device=device)
        sorted_pairs[:, 0] = torch.arange(num_pairs, dtype=torch.int32, device=device)
        return ExpertBlocks(sorted_pairs.reshape(-1), flat.to(torch.int32), block_m)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.index_add_(0, flat, torch.ones_like(flat))  # (E,) pairs per expert; no host sync
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)  # (E,) end row of each expert's blocks
    order = torch.argsort(flat, stable=True)  # (P,) pair ids by expert
    expert_of = flat[order]
    rank = torch.arange(num_pairs, device=device) - (torch.cumsum(counts, 0) - counts)[expert_of]
    rows = triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m
    sorted_pairs = torch.full((rows,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs[(padded_end - padded)[expert_of] + rank] = order.to(torch.int32)
    block_start = torch.arange(0, rows, block_m, device=device)
    block_expert = torch.searchsorted(padded_end, block_start, right=True)
    block_expert = torch.where(block_start < padded_end[-1], block_expert, -1)
    return ExpertBlocks(sorted_pairs, block_expert.to(torch.int32), block_m)


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, w_ptr, c_ptr, pairs_ptr, block_expert_ptr, weight_ptr,
    num_pairs, N, K, stride_am, stride_we, stride_wn, stride_cm,
    A_ROW_DIV: tl.constexpr, MUL_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """c[p] = a[p // A_ROW_DIV] @ w[e]^T (times weight[p]) for the pairs p of one block."""
    block, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(block_expert_ptr + block).to(tl.int64)
    if expert < 0:
        return
    pair = tl.load(pairs_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))  # (BLOCK_M,)
    valid = pair < num_pairs
    a_row = (pair // A_ROW_DIV).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    w_base = w_ptr + expert * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        a = tl.load(a_ptr + a_row[:, None] * stride_am + k[None, :],
                    mask=valid[:, None] & (k[None, :] < K), other=0.0)  # (BLOCK_M, BLOCK_K)
        w = tl.load(w_base + n[None, :].to(tl.int64) * stride_wn + k[:, None],
                    mask=(n[None, :] < N) & (k[:, None] < K), other=0.0)  # (BLOCK_K, BLOCK_N)
        acc += tl.dot(a, w.to(a.dtype), input_precision=PRECISION)
    if MUL_WEIGHT:  # the router weight in the epilogue: the sum over k needs no second pass
        acc *= tl.load(weight_ptr + pair, mask=valid, other=0.0).to(tl.float32)[:, None]
    c = c_ptr + pair.to(tl.int64)[:, None] * stride_cm + n[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & (n[None, :] < N))


def _grouped_gemm(a: torch.Tensor, w: torch.Tensor, blocks: ExpertBlocks, num_pairs: int,
                  a_row_div: int, weights: torch.Tensor | None) -> torch.Tensor:
    """(num_pairs, N) = rows of `a` @ w[e]^T, per expert block; w: (E, N, K) contiguous."""
    _, n, k = w.shape
    out = a.new_empty((num_pairs, n))
    cuda = a.is_cuda
    block_n = 64 if cuda else 16
    block_k = 64 if cuda else 16
    grid = (blocks.block_expert.numel(), triton.cdiv(n, block_n))
    _grouped_gemm_kernel[grid](
        a, w, out, blocks.sorted_pairs, blocks.block_expert,
        weights if weights is not None else a, num_pairs, n, k,
        a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        A_ROW_DIV=a_row_div, MUL_WEIGHT=weights is not None, BLOCK_M=blocks.block_m,
        BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=3 if cuda else 1,
    )
    return out


def _check_moe_args(x, w13, w2, topk_weights, topk_ids) -> None:
    if x.dim() != 2 or x.dtype not in _DTYPES or x.stride(-1) != 1:
        raise ValueError(f"x must be (num_tokens, hidden) {_DTYPES}, got {tuple(x.shape)} "
                         f"{x.dtype}")
    num_experts, two_i, hidden = w13.shape
    if hidden != x.shape[1] or two_i % 2 or w2.shape != (num_experts, hidden, two_i // 2):
        raise ValueError(f"w13 must be (E, 2I, {x.shape[1]}) and w2 (E, {x.shape[1]}, I); got "
                         f"{tuple(w13.shape)} and {tuple(w2.shape)}")
    if not (w13.is_contiguous() and w2.is_contiguous()) or {w13.dtype, w2.dtype} != {x.dtype}:
        raise ValueError("w13 and w2 must be contiguous, in x's dtype")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk_ids and topk_weights must be (num_tokens, K), got "
                         f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32/int64, got {topk_ids.dtype}")
    if len({t.device for t in (x, w13, w2, topk_weights, topk_ids)}) != 1:
        raise ValueError("x, weights and routing must share a device")


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, block_m: int | None = None) -> torch.Tensor:
    """x (T, H); w13 (E, 2I, H) = [gate | up]; w2 (E, H, I); topk_weights / topk_ids (T, K)
    -> (T, H) in x's dtype. SiLU gating."""
    from hearth.kernels.fused import silu_and_mul

    _check_moe_args(x, w13, w2, topk_weights, topk_ids)
    num_tokens, top_k = topk_ids.shape
    if num_tokens == 0:
        return torch.zeros_like(x)
    num_pairs = num_tokens * top_k
    if block_m is None:
        block_m = 16 if num_pairs <= 1024 or not x.is_cuda else 64
    blocks = align_pairs(topk_ids, w13.shape[0], block_m)
    inter = _grouped_gemm(x, w13, blocks, num_pairs, top_k, None)  # (P, 2I)
    act = silu_and_mul(inter)  # (P, I)
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    y = _grouped_gemm(act, w2, blocks, num_pairs, 1, weights)  # (P, H), weighted
    return y.view(num_tokens, top_k, -1).sum(1, dtype=torch.float32).to(x.dtype)


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Torch reference: every pair's expert MLP in fp32, weighted, summed over k."""
    _check_moe_args(x, w13, w2, topk_weights, topk_ids)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    xf = x.float()
    for e in topk_ids.unique().tolist():
        token, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        gate, up = (xf[token] @ w13[e].float().T).chunk(2, dim=-1)
        inter = (torch.nn.functional.silu(gate) * up).to(x.dtype).float()  # kernel rounds here
        y = inter @ w2[e].float().T * topk_weights[token, slot].float()[:, None]
        out.index_add_(0, token, y.to(x.dtype).float())
    return out.to(x.dtype)
