"""Verification: which proposed tokens the target model keeps, and the token it adds.

The target's forward pass computed logits at the K + 1 positions of each speculating sequence
(its last token and the K proposals). Row i is the target's distribution p_i for the token after
proposal i - 1:

    positions   [ last | d0 | d1 | d2 ]       K = 3 proposals
    target      [ p0   | p1 | p2 | p3 ]       p_i: next-token distribution after d_(i-1)
    accept d0 ~ p0?  d1 ~ p1?  d2 ~ p2?  -> a accepted, then one more token from p_a (or residual)

Greedy rows keep proposals while they equal the target's argmax, then add the argmax at the first
mismatch (or after the last proposal): token-identical to decoding without speculation.

Random rows use rejection sampling (Leviathan et al. 2023; Chen et al. 2023). Proposals here are
deterministic (prompt lookup, a greedy draft), so the draft distribution q is one-hot at d_i:
accept d_i with probability min(1, p_i(d_i) / q_i(d_i)) = p_i(d_i); on rejection draw from the
residual max(p_i - q_i, 0), i.e. p_i without d_i, renormalised. Each output token is then
distributed exactly as p_i (tests/test_speculative.py checks it statistically), so speculation
changes the speed of sampling, never its distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hearth.engine.outputs import ScheduledChunk
from hearth.engine.sampler import Sampler, SamplingRow


@dataclass(frozen=True)
class VerifyResult:
    """Per sequence: the accepted proposals followed by the target's own token."""

    token_ids: list[list[int]]
    num_accepted: list[int]


def verify(
    argmax: torch.Tensor,
    target_probs: torch.Tensor | None,
    draft_ids: torch.Tensor,
    num_drafts: torch.Tensor,
    greedy: torch.Tensor,
    generator: torch.Generator | None = None,
) -> VerifyResult:
    """argmax: (B, K + 1) int64, the target logits' argmax (greedy rows); target_probs:
    (B, K + 1, V) float32, the sampler's filtered probabilities (random rows; None when every row
    is greedy); draft_ids: (B, K) int64, padded past `num_drafts`: (B,) int64; greedy: (B,) bool.
    Reads the result back to the host (one sync)."""
    k = argmax.shape[1] - 1
    positions = torch.arange(k, device=draft_ids.device)
    valid = positions[None, :] < num_drafts[:, None]  # (B, K)
    safe_drafts = torch.where(valid, draft_ids, 0)
    keep = safe_drafts == argmax[:, :k]
    if target_probs is not None:
        p_draft = target_probs[:, :k].gather(-1, safe_drafts[..., None])[..., 0]  # (B, K)
        uniform = torch.rand(p_draft.shape, generator=generator, device=p_draft.device)
        keep = torch.where(greedy[:, None], keep, uniform < p_draft)
    keep &= valid
    num_accepted = keep.to(torch.int64).cumprod(dim=-1).sum(dim=-1)  # (B,) leading accepted
    final = argmax.gather(-1, num_accepted[:, None])[:, 0]
    if target_probs is not None:
        drawn = _final_tokens(target_probs, safe_drafts, num_accepted, num_drafts, generator)
        final = torch.where(greedy, final, drawn)
    return _to_lists(safe_drafts, num_accepted, final)


def verify_greedy(drafts: Sequence[int], argmax: list[int]) -> list[int]:
    """Greedy verification on the host: the drafts while they equal the target's argmax, then
    the argmax at the first mismatch (or after the last draft). argmax: len(drafts) + 1 ids."""
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == argmax[accepted]:
        accepted += 1
    return [*drafts[:accepted], argmax[accepted]]


def verify_chunks(sampler: Sampler, logits: torch.Tensor,
                  chunks: list[ScheduledChunk]) -> VerifyResult:
    """logits: (sum of K_i + 1, V), each speculating chunk's rows in order -> its tokens."""
    device = logits.device
    counts = [1 + len(c.spec_token_ids) for c in chunks]
    k = max(counts) - 1
    starts = torch.tensor([0, *counts[:-1]]).cumsum(0)
    # (B, K + 1) row of each position; a shorter proposal repeats its last row (never read)
    offsets = torch.minimum(torch.arange(k + 1)[None, :], torch.tensor(counts)[:, None] - 1)
    index = (starts[:, None] + offsets).to(device)
    target = logits[index][..., : sampler.vocab_size]  # (B, K + 1, V)
    drafts = torch.tensor([list(c.spec_token_ids) + [0] * (k + 1 - n)
                           for c, n in zip(chunks, counts, strict=True)], device=device)
    greedy_rows = [c.seq.sampling_params.greedy for c in chunks]
    greedy = torch.tensor(greedy_rows, device=device)
    argmax = target.argmax(dim=-1)
    probs = None
    if not all(greedy_rows):
        rows = [SamplingRow(c.seq.sampling_params, [], [], c.seq.sample_index)
                for c in chunks for _ in range(k + 1)]
        flat = sampler.probs(target.reshape(-1, target.shape[-1]), rows)
        probs = flat.reshape(len(chunks), k + 1, -1)
    num_drafts = torch.tensor([n - 1 for n in counts], device=device)
    return verify(argmax, probs, drafts[:, :k], num_drafts, greedy, sampler.rng(device))


def _final_tokens(target_probs: torch.Tensor, drafts: torch.Tensor, num_accepted: torch.Tensor,
                  num_drafts: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(B,) the token after the accepted ones: from p_a less the rejected draft d_a (a < its
    number of drafts), or from p_a itself when every proposal was accepted."""
    batch = target_probs.shape[0]
    rows = torch.arange(batch, device=target_probs.device)
    probs = target_probs[rows, num_accepted].clone()  # (B, V)
    rejected = num_accepted < num_drafts
    k = drafts.shape[1]
    if k:
        rejected_ids = drafts.gather(-1, num_accepted.clamp(max=k - 1)[:, None])[:, 0]
        probs[rows[rejected], rejected_ids[rejected]] = 0.0
        empty = probs.sum(dim=-1) <= 0  # the draft held all the mass: p_a is its own residual
        probs = torch.where(empty[:, None], target_probs[rows, num_accepted], probs)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)  # the exponential race: a draw from probs / sum


def _to_lists(drafts: torch.Tensor, num_accepted: torch.Tensor,
              final: torch.Tensor) -> VerifyResult:
    drafts_l, accepted_l, final_l = drafts.tolist(), num_accepted.tolist(), final.tolist()
    token_ids = [row[:a] + [f] for row, a, f in zip(drafts_l, accepted_l, final_l, strict=True)]
    return VerifyResult(token_ids, accepted_l)
