"""Fused sampling: one pass over each row of logits -> the drawn token id (exponential race).

For a row at temperature T > 0 the draw is argmax_v(logits_v / T - log E_v) with E_v ~ Exp(1),
which equals argmax_v(p_v / E_v) for p = softmax(logits / T): a sample from p (the same race
engine/sampler.py runs in torch). At T = 0 the row takes argmax_v(logits_v) (first index on ties,
as torch.argmax). Neither needs the softmax: no max/sum passes, no float32 copy of the logits.

Randomness is Philox4x32-10 (tl.randint4x), keyed by one 63-bit key per row; the vocabulary is
walked in groups of 4 * _QUARTER columns and one Philox call feeds four columns:

    group g (4 * Q columns):  [ j = 0: Q cols | j = 1 | j = 2 | j = 3 ]
    column g * 4Q + j * Q + i  <-  output j of Philox(key, counter = g * Q + i)

so a row's draw depends on its key and logits alone (not on its batch position, the chunking or
the launch shape). E = -log(U) with U = ((r >> 9) + 0.5) * 2^-23, strictly inside (0, 1): a U of
exactly 0 or 1 (what tl.rand can round to) would pick a token at random.

Two launches: grid (num_rows, num_chunks) finds each chunk's best (score, index); a second kernel
keeps the first best chunk per row. `exponential_race_ref` is the torch reference, bit for bit the
same random numbers (Philox in int64 arithmetic).
"""

import torch
import triton
import triton.language as tl

_QUARTER = 512  # columns per Philox output lane; part of the random stream's definition
_CHUNK = 4 * _QUARTER * 4  # columns per program: 4 groups
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_U_SCALE = 2.0**-23


@triton.jit
def _race_update(logits_row_ptr, cols, vocab, r, greedy, inv_temp, best, best_index):
    """Fold columns `cols` (their Philox words r) into each lane's running (best, index)."""
    mask = cols < vocab
    x = tl.load(logits_row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
    u = ((r >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2^-23: U in (0, 1)
    score = tl.where(greedy, x, x * inv_temp - tl.log(-tl.log(u)))
    score = tl.where(mask, score, float("-inf"))
    better = score > best  # strict: a lane keeps its first (lowest) column on ties
    return tl.where(better, score, best), tl.where(better, cols, best_index)


@triton.jit
def _chunk_kernel(
    logits_ptr, temp_ptr, key_ptr, best_ptr, index_ptr, vocab, stride_row, num_chunks,
    QUARTER: tl.constexpr, CHUNK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    temp = tl.load(temp_ptr + row)
    key = tl.load(key_ptr + row)
    greedy = temp == 0.0
    inv_temp = 1.0 / tl.where(greedy, 1.0, temp)
    row_ptr = logits_ptr + row * stride_row
    lane = tl.arange(0, QUARTER)
    best = tl.full([QUARTER], float("-inf"), tl.float32)
    best_index = tl.zeros([QUARTER], tl.int32)
    for base in range(chunk * CHUNK, (chunk + 1) * CHUNK, 4 * QUARTER):
        r0, r1, r2, r3 = tl.randint4x(key, base // 4 + lane)
        cols = base + lane
        best, best_index = _race_update(row_ptr, cols, vocab, r0, greedy, inv_temp, best,
                                        best_index)
        best, best_index = _race_update(row_ptr, cols + QUARTER, vocab, r1, greedy, inv_temp,
                                        best, best_index)
        best, best_index = _race_update(row_ptr, cols + 2 * QUARTER, vocab, r2, greedy,
                                        inv_temp, best, best_index)
        best, best_index = _race_update(row_ptr, cols + 3 * QUARTER, vocab, r3, greedy,
                                        inv_temp, best, best_index)
    top = tl.max(best, 0)
    first = tl.min(tl.where(best == top, best_index, 2147483647), 0)
    first = tl.where(top == float("-inf"), chunk * CHUNK, first)  # all -inf: the chunk's first
    tl.store(best_ptr + row * num_chunks + chunk, top)
    tl.store(index_ptr + row * num_chunks + chunk, first)


@triton.jit
def _pick_kernel(best_ptr, index_ptr, out_ptr, num_chunks, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    mask = c < num_chunks
    best = tl.load(best_ptr + row * num_chunks + c, mask=mask, other=float("-inf"))
    top = tl.max(best, 0)
    first_chunk = tl.min(tl.where(mask & (best == top), c, BLOCK_C), 0)
    index = tl.load(index_ptr + row * num_chunks + first_chunk)
    tl.store(out_ptr + row, index.to(tl.int64))


def _check_args(logits: torch.Tensor, temperatures: torch.Tensor, keys: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.dtype not in _DTYPES or logits.stride(-1) != 1:
        raise ValueError(
            f"logits must be 2-D (num_rows, vocab) in {_DTYPES}, contiguous in the "
            f"vocab dimension; got {tuple(logits.shape)} {logits.dtype}"
        )
    num_rows = logits.shape[0]
    if temperatures.shape != (num_rows,) or temperatures.dtype != torch.float32:
        raise ValueError(
            f"temperatures must be ({num_rows},) float32, got "
            f"{tuple(temperatures.shape)} {temperatures.dtype}"
        )
    if keys.shape != (num_rows,) or keys.dtype != torch.int64:
        raise ValueError(f"keys must be ({num_rows},) int64, got {tuple(keys.shape)} {keys.dtype}")
    if not (logits.device == temperatures.device == keys.device):
        raise ValueError("logits, temperatures and keys must be on the same device")
    if logits.shape[1] >= 2**31 - _CHUNK:
        raise ValueError(f"vocab {logits.shape[1]} is too large for int32 column indices")


def exponential_race(
    logits: torch.Tensor, temperatures: torch.Tensor, keys: torch.Tensor
) -> torch.Tensor:
    """logits (num_rows, vocab), temperatures (num_rows,) float32 (0 = greedy), keys (num_rows,)
    int64 Philox keys -> (num_rows,) int64 token ids, left on the device (no sync)."""
    _check_args(logits, temperatures, keys)
    num_rows, vocab = logits.shape
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows == 0:
        return out
    num_chunks = triton.cdiv(vocab, _CHUNK)
    best = torch.empty((num_rows, num_chunks), dtype=torch.float32, device=logits.device)
    index = torch.empty((num_rows, num_chunks), dtype=torch.int32, device=logits.device)
    _chunk_kernel[(num_rows, num_chunks)](
        logits, temperatures, keys, best, index, vocab, logits.stride(0), num_chunks,
        QUARTER=_QUARTER, CHUNK=_CHUNK, num_warps=4,
    )
    _pick_kernel[(num_rows,)](best, index, out, num_chunks,
                              BLOCK_C=triton.next_power_of_2(num_chunks))
    return out


# ------------------------------------------------------------------------------ torch reference
_MASK32 = 0xFFFFFFFF
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57


def _mul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * b for a constant a and b holding uint32 values in int64
    (16-bit limbs of a keep every product under 2^49)."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    hi_part, lo_part = a_hi * b, a_lo * b  # each < 2^48
    high = (hi_part + (lo_part >> 16)) >> 16
    low = (((hi_part & 0xFFFF) << 16) + lo_part) & _MASK32
    return high, low


def philox4x32_ref(keys: torch.Tensor, counters: torch.Tensor) -> list[torch.Tensor]:
    """Triton's randint4x (10 rounds) with c0 = counters, c1 = c2 = c3 = 0: keys (num_rows, 1)
    int64, counters (num_rows, n) -> four (num_rows, n) int64 tensors of uint32 values."""
    k0, k1 = keys & _MASK32, (keys >> 32) & _MASK32
    c0, c1 = counters & _MASK32, torch.zeros_like(counters)
    c2, c3 = torch.zeros_like(counters), torch.zeros_like(counters)
    for _ in range(10):
        hi_b, lo_b = _mul32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _MASK32, (k1 + _PHILOX_KEY_B) & _MASK32
    return [c0, c1, c2, c3]


def race_scores_ref(
    logits: torch.Tensor, temperatures: torch.Tensor, keys: torch.Tensor
) -> torch.Tensor:
    """The per-column scores the kernel maximises -> (num_rows, vocab) float32."""
    _check_args(logits, temperatures, keys)
    num_rows, vocab = logits.shape
    cols = torch.arange(vocab, device=logits.device)
    group, within = cols // (4 * _QUARTER), cols % (4 * _QUARTER)
    counters = (group * _QUARTER + within % _QUARTER).expand(num_rows, vocab)
    outputs = philox4x32_ref(keys[:, None], counters)
    which = (within // _QUARTER).expand(num_rows, vocab)  # Philox output j of each column
    r = torch.stack(outputs).gather(0, which[None]).squeeze(0)  # (num_rows, vocab)
    u = ((r >> 9).float() + 0.5) * _U_SCALE
    x = logits.float()
    greedy = (temperatures == 0)[:, None]
    inv_temp = 1.0 / torch.where(greedy[:, 0], 1.0, temperatures)[:, None]
    return torch.where(greedy, x, x * inv_temp - torch.log(-torch.log(u)))


def exponential_race_ref(
    logits: torch.Tensor, temperatures: torch.Tensor, keys: torch.Tensor
) -> torch.Tensor:
    """Torch reference for exponential_race (torch.argmax: first index on ties)."""
    return race_scores_ref(logits, temperatures, keys).argmax(dim=-1)
