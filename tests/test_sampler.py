"""Sampler: seeded reproducibility, and each filter against a straightforward reference."""

import math

import pytest
import torch

from hearth.engine.sampler import Sampler, SamplingRow, apply_penalties
from hearth.engine.sampling_params import SamplingParams

VOCAB = 50


def _row(**kw) -> SamplingRow:
    kw.setdefault("max_tokens", 8)
    return SamplingRow(SamplingParams(**kw), prompt_token_ids=[1, 2, 3], output_token_ids=[4, 4, 9])


def test_greedy_takes_argmax():
    logits = torch.randn(4, VOCAB)
    out = Sampler(VOCAB).sample(logits, [_row(temperature=0)] * 4)
    assert out.token_ids == logits.argmax(-1).tolist()


def test_seeded_rows_reproducible_across_runs_and_batch_positions():
    torch.manual_seed(0)
    logits = torch.randn(1, VOCAB)
    seeded = _row(temperature=1.0, seed=42)
    alone = Sampler(VOCAB, seed=1).sample(logits, [seeded]).token_ids[0]
    others = torch.randn(5, VOCAB)
    batch = torch.cat([others[:3], logits, others[3:]])
    rows = [_row(temperature=1.0)] * 3 + [seeded] + [_row(temperature=1.0)] * 2
    in_batch = Sampler(VOCAB, seed=7).sample(batch, rows).token_ids[3]
    assert alone == in_batch


def test_seeded_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, math.log(3.0)] + [-1e9] * (VOCAB - 2)])
    sampler = Sampler(VOCAB)
    counts = [0, 0]
    for seed in range(400):
        counts[sampler.sample(logits, [_row(temperature=1.0, seed=seed)]).token_ids[0]] += 1
    assert 0.65 < counts[1] / 400 < 0.85  # p = 0.75


def _draw_support(logits: torch.Tensor, row: SamplingRow, draws: int = 300) -> set[int]:
    sampler = Sampler(VOCAB, seed=3)
    return {sampler.sample(logits, [row]).token_ids[0] for _ in range(draws)}


def test_top_k_keeps_only_k_most_likely():
    logits = torch.randn(1, VOCAB)
    support = _draw_support(logits, _row(temperature=5.0, top_k=3))
    assert support <= set(logits[0].topk(3).indices.tolist())


def test_top_p_keeps_smallest_prefix_reaching_p():
    logits = torch.randn(1, VOCAB)
    probs = logits[0].softmax(-1)
    order = probs.argsort(descending=True).tolist()
    keep, mass = [], 0.0
    for t in order:  # reference: add tokens until the mass reaches p
        keep.append(t)
        mass += probs[t].item()
        if mass >= 0.5:
            break
    support = _draw_support(logits, _row(temperature=1.0, top_p=0.5))
    assert support <= set(keep)


def test_min_p_drops_tokens_below_fraction_of_max():
    logits = torch.randn(1, VOCAB) * 3
    probs = logits[0].softmax(-1)
    allowed = set((probs >= 0.2 * probs.max()).nonzero()[:, 0].tolist())
    assert _draw_support(logits, _row(temperature=1.0, min_p=0.2)) <= allowed


def test_penalties_match_reference():
    logits = torch.randn(1, VOCAB)
    row = _row(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25)
    got = apply_penalties(logits, [row])[0]
    ref = logits[0].clone()
    for t in set(row.prompt_token_ids) | set(row.output_token_ids):
        ref[t] = ref[t] / 1.3 if ref[t] > 0 else ref[t] * 1.3
    for t in set(row.output_token_ids):
        count = row.output_token_ids.count(t)
        ref[t] -= 0.25 * count + 0.5
    torch.testing.assert_close(got, ref)


def test_logprobs_are_log_softmax_and_top_sorted():
    logits = torch.randn(2, VOCAB)
    out = Sampler(VOCAB).sample(logits, [_row(temperature=0, logprobs=3)] * 2)
    ref = logits.log_softmax(-1)
    for i, lp in enumerate(out.logprobs):
        assert lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(ref[i, lp.token_id].item(), abs=1e-5)
        assert list(lp.top_token_ids) == ref[i].topk(3).indices.tolist()
        assert list(lp.top_logprobs) == sorted(lp.top_logprobs, reverse=True)
