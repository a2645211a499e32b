"""kernels/sampling.py: the fused exponential race against its torch reference (same Philox words),
greedy rows against torch.argmax, the draw's distribution, and the sampler's per-row dispatch.

Without CUDA the kernel runs in Triton's interpreter (conftest), so shapes are small; the
`gpu`-marked test repeats the comparison at a full serving shape (256 x 151,936 bf16).
"""

import math

import pytest
import torch

from hearth.engine.sampler import Sampler, SamplingRow
from hearth.engine.sampling_params import SamplingParams
from hearth.kernels.sampling import (
    exponential_race,
    exponential_race_ref,
    philox4x32_ref,
    race_scores_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _inputs(num_rows, vocab, dtype, device=DEVICE):
    logits = (3 * torch.randn(num_rows, vocab, device=device)).to(dtype)
    temps = torch.rand(num_rows, device=device) * 1.5 + 0.1
    temps[::3] = 0.0  # every third row greedy
    keys = torch.randint(0, 2**63 - 1, (num_rows,), device=device)
    return logits, temps, keys


def _check_draws(logits, temps, keys):
    """Every id is the reference's argmax, or (float rounding of log) within 1e-5 of its score."""
    ids = exponential_race(logits, temps, keys)
    ref = exponential_race_ref(logits, temps, keys)
    scores = race_scores_ref(logits, temps, keys)
    top = scores.max(dim=-1).values
    chosen = scores.gather(1, ids[:, None])[:, 0]
    torch.testing.assert_close(chosen, top, atol=1e-5, rtol=1e-5)
    assert (ids == ref).float().mean() >= 0.99
    greedy = temps == 0
    assert torch.equal(ids[greedy], logits[greedy].float().argmax(dim=-1))


def test_philox_ref_matches_triton_randint4x():
    """The reference's Philox words equal Triton's, checked through a draw at T = 1 on zero
    logits: the score is then -log(E) alone, so the winner is set by the random words."""
    logits = torch.zeros(4, 3000, device=DEVICE)
    temps = torch.ones(4, device=DEVICE)
    keys = torch.tensor([0, 1, 2**40 + 7, 2**62 + 12345], device=DEVICE)
    assert torch.equal(exponential_race(logits, temps, keys),
                       exponential_race_ref(logits, temps, keys))
    # Known-answer check of the reference itself (Random123's Philox4x32-10 test vector).
    key = torch.tensor([[0]])
    words = philox4x32_ref(key, torch.zeros(1, 1, dtype=torch.int64))
    assert [int(w) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("vocab", [1, 37, 2048, 4096 + 513, 3 * 8192 + 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_race_matches_reference(vocab, dtype):
    _check_draws(*_inputs(5, vocab, dtype))


def test_greedy_ties_take_the_first_index():
    logits = torch.zeros(3, 9000, device=DEVICE)
    logits[0, [5, 8200, 8999]] = 2.0
    logits[1, [8193, 8194]] = 1.0
    logits[2] = float("-inf")
    ids = exponential_race(logits, torch.zeros(3, device=DEVICE), torch.zeros(3, dtype=torch.int64,
                           device=DEVICE))
    assert ids.tolist() == [5, 8193, 0]


def test_race_follows_the_distribution():
    """Reference draws (the kernel's own numbers, see above) over many keys match softmax(l / T)."""
    logits = torch.tensor([0.0, math.log(3.0), -1.0, -30.0]).repeat(20000, 1)
    temps = torch.full((20000,), 1.0)
    keys = torch.arange(20000, dtype=torch.int64) * 7919 + 11
    counts = torch.bincount(exponential_race_ref(logits, temps, keys), minlength=4).float()
    expected = torch.softmax(logits[0], dim=-1) * 20000
    assert torch.all((counts - expected).abs() <= 4 * expected.sqrt() + 1)
    half = exponential_race_ref(logits, torch.full((20000,), 0.5), keys)  # sharper at T = 0.5
    assert (half == 1).float().mean() > counts[1] / 20000 + 0.05


def test_bad_arguments_raise():
    logits, temps, keys = _inputs(2, 16, torch.float32)
    with pytest.raises(ValueError, match="temperatures"):
        exponential_race(logits, temps.double(), keys)
    with pytest.raises(ValueError, match="keys"):
        exponential_race(logits, temps, keys[:1])
    with pytest.raises(ValueError, match="logits"):
        exponential_race(logits[:, ::2], temps, keys)


# ---------------------------------------------------------------------------- sampler dispatch
VOCAB = 300


def _row(**kw) -> SamplingRow:
    kw.setdefault("max_tokens", 8)
    return SamplingRow(SamplingParams(**kw), [1, 2], [3, 4, 5])


def test_kernel_rows_depend_on_their_own_params_only():
    """A seeded row draws the same token alone, among kernel rows, and beside a top-k row (which
    sends that row, and only it, through the torch path)."""
    logits = torch.randn(3, VOCAB, device=DEVICE)
    seeded = _row(temperature=0.8, seed=5)
    sampler = Sampler(VOCAB, seed=1, use_kernel=True)
    alone = sampler.sample(logits[1:2], [seeded]).token_ids[0]
    plain = sampler.sample(logits, [_row(temperature=1.0), seeded, _row(temperature=0)])
    mixed = Sampler(VOCAB, seed=9, use_kernel=True).sample(
        logits, [_row(temperature=1.0, top_k=3), seeded, _row(temperature=0)]
    )
    assert alone == plain.token_ids[1] == mixed.token_ids[1]
    assert plain.token_ids[2] == mixed.token_ids[2] == int(logits[2].argmax())
    top3 = logits[0].topk(3).indices.tolist()
    assert mixed.token_ids[0] in top3


def test_torch_path_unchanged_for_rows_the_kernel_does_not_take():
    """Rows with top-k draw exactly what the sampler without the kernel draws."""
    logits = torch.randn(4, VOCAB, device=DEVICE)
    rows = [_row(temperature=0.7, top_k=20)] * 4
    with_kernel = Sampler(VOCAB, seed=3, use_kernel=True).sample(logits, rows).token_ids
    without = Sampler(VOCAB, seed=3, use_kernel=False).sample(logits, rows).token_ids
    assert with_kernel == without


def test_sample_on_device_uses_the_kernel_draw():
    logits = torch.randn(4, VOCAB, device=DEVICE).to(torch.bfloat16)
    rows = [_row(temperature=0.6, seed=s) for s in range(4)]
    sampler = Sampler(VOCAB, seed=0, use_kernel=True)
    on_device = sampler.sample_on_device(logits, rows).tolist()
    assert on_device == sampler.sample(logits, rows).token_ids


@pytest.mark.gpu
def test_race_full_shape():
    """W1's shape: 256 rows over Qwen3's 151,936-token vocabulary, bf16 logits."""
    _check_draws(*_inputs(256, 151936, torch.bfloat16))
    logits, temps, keys = _inputs(64, 128256, torch.float32)
    _check_draws(logits, temps, keys)
