"""Small fused kernels around attention: RMSNorm (+ residual add), per-head q/k RMSNorm, rotary
embedding, SiLU-and-mul.

Each is memory bound: one program per token reads its row once and writes it once, computing in
fp32. Numerics follow HF transformers: the residual sum is rounded to the activation dtype before it
is normalised (as the unfused model would store it), rotary is neox style (rotate_half on the first
and second halves of head_dim). On Hopper they launch with PDL (kernels/pdl.py).
"""

import torch
import triton
import triton.language as tl

from hearth.kernels import pdl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _warps(block: int) -> int:
    return max(1, min(16, block // 256))


# ---------------------------------------------------------------------------------------- RMSNorm
@triton.jit
def _normalized(h, w, eps, N: tl.constexpr, AXIS: tl.constexpr):
    """h (fp32 rows of N values along AXIS, zero-padded) / rms(row) * w: the arithmetic every
    RMSNorm kernel here shares, so the fused q/k norm gives the plain norm's values."""
    inv_rms = tl.rsqrt(tl.sum(h * h, AXIS, keep_dims=True) / N + eps)
    return h * inv_rms * w


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr, eps,
    stride_x, stride_r, stride_o, stride_nr,
    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr,
):
    pdl.launch_dependents(PDL, 1)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    pdl.wait(PDL)  # above: the weight only (kernels/pdl.py)
    h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
    pdl.launch_dependents(PDL, 2)
    if HAS_RESIDUAL:
        tl.store(new_res_ptr + row * stride_nr + cols, h, mask=mask)
    out = _normalized(h.to(tl.float32), w, eps, HIDDEN, 0)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _check_rows(name: str, t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if t.shape != shape or t.dtype != dtype:
        raise ValueError(f"{name} must be {shape} {dtype}, got {tuple(t.shape)} {t.dtype}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension")


def _check_rms_args(x, weight, residual) -> None:
    if x.dim() != 2 or x.dtype not in _DTYPES:
        raise ValueError(
            f"x must be 2-D (num_tokens, hidden) in {_DTYPES}, got {x.shape} {x.dtype}"
        )
    _check_rows("x", x, tuple(x.shape), x.dtype)
    if weight.shape != (x.shape[1],):
        raise ValueError(f"weight must be ({x.shape[1]},), got {tuple(weight.shape)}")
    if weight.device != x.device or (residual is not None and residual.device != x.device):
        raise ValueError("x, weight and residual must be on the same device")
    if residual is not None:
        _check_rows("residual", residual, tuple(x.shape), x.dtype)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x (num_tokens, hidden); with residual: (rmsnorm(x + residual), x + residual)."""
    _check_rms_args(x, weight, residual)
    out = torch.empty_like(x)
    new_res = torch.empty_like(x) if residual is not None else out  # unused without residual
    res = residual if residual is not None else x
    num_tokens, hidden = x.shape
    if num_tokens > 0:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(num_tokens,)](
            x, res, weight.contiguous(), out, new_res, eps,
            x.stride(0), res.stride(0), out.stride(0), new_res.stride(0),
            HIDDEN=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None,
            num_warps=_warps(block), **pdl.launch(x.device, small=True),
        )
    return out if residual is None else (out, new_res)


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Torch reference for rms_norm."""
    _check_rms_args(x, weight, residual)
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    hf = h.float()
    out = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    return out if residual is None else (out, h)


# ------------------------------------------------------------------ per-head q/k RMSNorm (Qwen3)
@triton.jit
def _qk_rms_norm_kernel(
    qkv_ptr, qw_ptr, kw_ptr, eps, stride_t,
    NUM_Q_HEADS: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    """One program per token: its NUM_HEADS (q then k) rows of HEAD_DIM as one tile, each row
    normalised in place with the q or the k weight. (A program per head and token ran 24 one-warp
    programs a token for Qwen3-0.6B; a tile per token fills its warps.)"""
    pdl.launch_dependents(PDL, 1)
    token = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (heads < NUM_HEADS) & (cols < HEAD_DIM)
    qw = tl.load(qw_ptr + cols, mask=cols < HEAD_DIM, other=0.0).to(tl.float32)
    kw = tl.load(kw_ptr + cols, mask=cols < HEAD_DIM, other=0.0).to(tl.float32)
    w = tl.where(heads < NUM_Q_HEADS, qw, kw)
    pdl.wait(PDL)  # above: the weights only (kernels/pdl.py)
    ptr = qkv_ptr + token * stride_t + heads * HEAD_DIM + cols
    h = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    pdl.launch_dependents(PDL, 2)
    tl.store(ptr, _normalized(h, w, eps, HEAD_DIM, 1).to(qkv_ptr.dtype.element_ty), mask=mask)


def _check_qk_norm_args(qkv, num_heads, num_kv_heads, head_dim, q_weight, k_weight) -> None:
    width = (num_heads + num_kv_heads) * head_dim
    if qkv.dim() != 2 or qkv.shape[1] < width or qkv.dtype not in _DTYPES or qkv.stride(1) != 1:
        raise ValueError(f"qkv must be 2-D (num_tokens, >= {width}) in {_DTYPES}, contiguous in "
                         f"its last dimension; got {tuple(qkv.shape)} {qkv.dtype}")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w.shape != (head_dim,) or w.device != qkv.device:
            raise ValueError(f"{name} must be ({head_dim},) on {qkv.device}, got "
                             f"{tuple(w.shape)} on {w.device}")


def qk_rms_norm_(
    qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
    q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
) -> None:
    """RMSNorm of every q head (columns [0, num_heads * head_dim)) and k head (the next
    num_kv_heads * head_dim) of the projection's output qkv (num_tokens, width), in place: one
    launch where the separate q and k norms took four (the strided heads were copied out
    first)."""
    _check_qk_norm_args(qkv, num_heads, num_kv_heads, head_dim, q_weight, k_weight)
    if qkv.shape[0] == 0:
        return
    block = triton.next_power_of_2(head_dim)
    block_h = triton.next_power_of_2(num_heads + num_kv_heads)
    _qk_rms_norm_kernel[(qkv.shape[0],)](
        qkv, q_weight.contiguous(), k_weight.contiguous(), eps, qkv.stride(0),
        NUM_Q_HEADS=num_heads, NUM_HEADS=num_heads + num_kv_heads, HEAD_DIM=head_dim,
        # a warp a 1,024 values of the tile: 4 for Qwen3-0.6B's 32 x 128 (24 heads padded)
        BLOCK_H=block_h, BLOCK=block, num_warps=_warps(block * block_h // 4),
        **pdl.launch(qkv.device, small=True),
    )


def qk_rms_norm_ref(
    qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
    q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
) -> None:
    """Torch reference for qk_rms_norm_ (rms_norm_ref on each head's row, in place)."""
    _check_qk_norm_args(qkv, num_heads, num_kv_heads, head_dim, q_weight, k_weight)
    q_end, k_end = num_heads * head_dim, (num_heads + num_kv_heads) * head_dim
    for lo, hi, w in ((0, q_end, q_weight), (q_end, k_end, k_weight)):
        rows = qkv[:, lo:hi].reshape(-1, head_dim)  # a copy: the heads are strided
        qkv[:, lo:hi] = rms_norm_ref(rows, w, eps).view(qkv.shape[0], -1)


# ----------------------------------------------------------------------------------------- Rotary
@triton.jit
def _rotate_heads(ptr, stride_h, cos, sin, NUM_HEADS: tl.constexpr, HALF: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate all heads of one token in place: x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin."""
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < NUM_HEADS) & (j < HALF)
    first = ptr + h * stride_h + j  # (BLOCK_H, BLOCK_HALF) first halves
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(ptr.dtype.element_ty), mask=mask)
    tl.store(first + HALF, (x2 * cos + x1 * sin).to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr, q_ptr, k_ptr, cache_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr, PDL: tl.constexpr,
):
    pdl.launch_dependents(PDL, 1)
    pdl.wait(PDL)  # positions, q and k may come from the kernels before (kernels/pdl.py)
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cache_ptr + pos * stride_cache + j, mask=j < HALF, other=0.0)[None, :]
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + j, mask=j < HALF, other=0.0)[None, :]
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, cos, sin, NUM_Q_HEADS, HALF,
                  BLOCK_QH, BLOCK_HALF)
    pdl.launch_dependents(PDL, 2)
    _rotate_heads(k_ptr + token * stride_kt, stride_kh, cos, sin, NUM_K_HEADS, HALF,
                  BLOCK_KH, BLOCK_HALF)


def _heads_view(name: str, t: torch.Tensor, num_tokens: int, head_dim: int) -> torch.Tensor:
    """(num_tokens, heads * head_dim) or (num_tokens, heads, head_dim) -> the 3-D view."""
    if t.dim() not in (2, 3) or t.shape[0] != num_tokens or t.shape[-1] % head_dim != 0:
        raise ValueError(f"{name} must be ({num_tokens}, heads[, ]{head_dim}), got {t.shape}")
    if t.dtype not in _DTYPES or t.stride(-1) != 1:
        raise ValueError(f"{name} must be {_DTYPES} and contiguous in its last dimension")
    view = t.view(num_tokens, -1, head_dim)  # (num_tokens, heads, head_dim), shares memory
    return view


def _check_rotary_args(positions, query, key, cos_sin_cache, head_dim):
    if positions.dim() != 1 or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"positions must be 1-D int32/int64, got {positions.shape} {positions.dtype}"
        )
    if head_dim % 2 != 0:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim:
        raise ValueError(
            f"cos_sin_cache must be (max_position, {head_dim}), got {cos_sin_cache.shape}"
        )
    if cos_sin_cache.dtype != torch.float32:
        raise ValueError(f"cos_sin_cache must be float32, got {cos_sin_cache.dtype}")
    devices = {t.device for t in (positions, query, key, cos_sin_cache)}
    if len(devices) != 1:
        raise ValueError(f"positions, query, key and cos_sin_cache must share a device: {devices}")
    n = positions.shape[0]
    return _heads_view("query", query, n, head_dim), _heads_view("key", key, n, head_dim)


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    head_dim: int,
) -> None:
    """Rotate query/key (num_tokens, heads[, ]head_dim) in place at their positions (neox style)."""
    q, k = _check_rotary_args(positions, query, key, cos_sin_cache, head_dim)
    half = head_dim // 2
    if positions.shape[0] == 0:
        return
    cache = cos_sin_cache.contiguous()
    _rotary_kernel[(positions.shape[0],)](
        positions, q, k, cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cache.stride(0),
        NUM_Q_HEADS=q.shape[1], NUM_K_HEADS=k.shape[1], HALF=half,
        BLOCK_QH=triton.next_power_of_2(q.shape[1]), BLOCK_KH=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(half), **pdl.launch(q.device, small=True),
    )


def rotary_embedding_ref(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    head_dim: int,
) -> None:
    """Torch reference for rotary_embedding (fp32 math, in place)."""
    q, k = _check_rotary_args(positions, query, key, cos_sin_cache, head_dim)
    cos, sin = cos_sin_cache[positions.long()].chunk(2, dim=-1)  # (num_tokens, head_dim // 2)
    cos, sin = cos[:, None, :], sin[:, None, :]  # (num_tokens, 1, head_dim // 2)
    for x in (q, k):
        x1, x2 = x.float().chunk(2, dim=-1)
        x.copy_(torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1))


# -------------------------------------------------------------------------------- SiLU and mul
@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, D: tl.constexpr, BLOCK: tl.constexpr,
                         PDL: tl.constexpr):
    pdl.launch_dependents(PDL, 1)
    pdl.wait(PDL)  # x is the previous kernel's output (kernels/pdl.py)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + D + cols, mask=mask, other=0.0).to(tl.float32)
    pdl.launch_dependents(PDL, 2)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _check_silu_args(x: torch.Tensor) -> None:
    if x.dim() != 2 or x.shape[1] % 2 != 0:
        raise ValueError(f"x must be (num_tokens, 2 * d), got {tuple(x.shape)}")
    if x.dtype not in _DTYPES or x.stride(-1) != 1:
        raise ValueError(f"x must be {_DTYPES} and contiguous in its last dimension")


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[:, :d]) * x[:, d:] for x (num_tokens, 2 * d) -> (num_tokens, d)."""
    _check_silu_args(x)
    num_tokens, d = x.shape[0], x.shape[1] // 2
    out = x.new_empty((num_tokens, d))
    if num_tokens > 0:
        block = min(1024, triton.next_power_of_2(d))
        grid = (num_tokens, triton.cdiv(d, block))
        _silu_and_mul_kernel[grid](x, out, x.stride(0), out.stride(0), D=d, BLOCK=block,
                                   **pdl.launch(x.device, small=True))
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Torch reference for silu_and_mul (fp32 math)."""
    _check_silu_args(x)
    gate, up = x.float().chunk(2, dim=-1)  # (num_tokens, d) each
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)
