"""Fused MoE (kernels/moe.py) against its torch reference on fresh random inputs, in Triton's
interpreter at small shapes: the unsorted (decode) and the sorted (prefill) path, fp32 and
fp16; and the alignment's invariants (each pair once, in a block of its own expert)."""

import pytest
import torch

from hearth.kernels.moe import align_pairs, fused_moe, fused_moe_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(num_tokens, num_experts, top_k, hidden, inter, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    weights, ids = torch.softmax(logits, -1).topk(top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    return [t.to(DEVICE) for t in (x.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids)]


@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 8, 2), (3, 4, 2), (9, 4, 2),
                                                          (13, 8, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_moe_matches_reference(num_tokens, num_experts, top_k, dtype):
    x, w13, w2, weights, ids = _inputs(num_tokens, num_experts, top_k, 32, 16, dtype,
                                       seed=num_tokens)
    got = fused_moe(x, w13, w2, weights, ids)
    want = fused_moe_ref(x, w13, w2, weights, ids)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_block_m_does_not_change_the_result():
    x, w13, w2, weights, ids = _inputs(20, 4, 2, 32, 16, torch.float32, seed=5)
    torch.testing.assert_close(fused_moe(x, w13, w2, weights, ids, block_m=16),
                               fused_moe(x, w13, w2, weights, ids, block_m=32),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_tokens,num_experts,top_k,block_m", [(1, 8, 2, 16), (9, 4, 2, 16),
                                                                  (40, 16, 4, 16),
                                                                  (40, 3, 2, 64)])
def test_alignment_places_every_pair_once_with_its_expert(num_tokens, num_experts, top_k,
                                                          block_m):
    gen = torch.Generator().manual_seed(num_tokens)
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k]
                       for _ in range(num_tokens)])
    blocks = align_pairs(ids, num_experts, block_m)
    num_pairs = ids.numel()
    rows = blocks.sorted_pairs.view(-1, block_m)
    assert rows.shape[0] == blocks.block_expert.numel()
    seen = []
    for block, expert in enumerate(blocks.block_expert.tolist()):
        pairs = [p for p in rows[block].tolist() if p < num_pairs]
        if expert < 0:
            assert not pairs  # unused blocks hold only padding
            continue
        assert all(ids.view(-1)[p] == expert for p in pairs)
        seen += pairs
    assert sorted(seen) == list(range(num_pairs))


def test_bad_arguments_are_clear():
    x, w13, w2, weights, ids = _inputs(2, 4, 2, 32, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match="w13 must be"):
        fused_moe(x, w13[:, :, :16], w2, weights, ids)
    with pytest.raises(ValueError, match="topk_ids must be int32/int64"):
        fused_moe(x, w13, w2, weights, ids.float())
