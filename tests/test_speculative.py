"""Speculative decoding end to end on CPU: verification and rejection sampling, greedy output
token-identical with and without speculation (tiny models and the default model), the sampled
distribution unchanged (statistical tests), preemption, async steps, the counters."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import save_tiny_model

from hearth import LLM, SamplingParams
from hearth.engine.speculative import SpeculativeConfig
from hearth.engine.speculative.verify import verify, verify_greedy


def chi2_threshold(dof: int, z: float = 3.09) -> float:
    """The chi-square quantile at p = 0.001 (z = 3.09), Wilson-Hilferty's approximation."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def chi2_two_sample(a: dict, b: dict) -> tuple[float, int]:
    """Statistic and degrees of freedom for equal-size samples (counts per cell)."""
    cells = [c for c in set(a) | set(b) if a.get(c, 0) + b.get(c, 0) > 0]
    stat = sum((a.get(c, 0) - b.get(c, 0)) ** 2 / (a.get(c, 0) + b.get(c, 0)) for c in cells)
    return stat, max(len(cells) - 1, 1)


# -- verify() ------------------------------------------------------------------------------------

def test_greedy_verification_keeps_the_matching_prefix_and_adds_the_argmax():
    argmax = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8]])
    drafts = torch.tensor([[5, 6, 9], [5, 6, 7], [1, 6, 7]])
    result = verify(argmax, None, drafts, torch.tensor([3, 3, 2]), torch.tensor([True] * 3))
    assert result.token_ids == [[5, 6, 7], [5, 6, 7, 8], [5]]
    assert result.num_accepted == [2, 3, 0]


def test_greedy_verification_on_the_host_matches_the_device_path():
    """verify_greedy (one read-back of the argmax, the comparison in Python) = verify()."""
    gen = torch.Generator().manual_seed(5)
    for _ in range(200):
        k = int(torch.randint(1, 9, (1,), generator=gen))
        num = int(torch.randint(1, k + 1, (1,), generator=gen))
        argmax = torch.randint(0, 3, (1, k + 1), generator=gen)  # 3 ids: long matches happen
        drafts = torch.randint(0, 3, (1, k), generator=gen)
        expected = verify(argmax, None, drafts, torch.tensor([num]), torch.tensor([True]))
        got = verify_greedy(drafts[0, :num].tolist(), argmax[0, : num + 1].tolist())
        assert got == expected.token_ids[0]


def test_rejection_sampling_preserves_the_target_distribution():
    """Whatever the (deterministic) proposal, the first token is distributed as p0, and the second,
    given the first proposal was kept, as p1."""
    gen = torch.Generator().manual_seed(0)
    vocab, rows = 6, 40_000
    p = torch.softmax(torch.randn(3, vocab, generator=gen) * 1.5, dim=-1)  # positions 0, 1, 2
    for draft0, draft1 in [(int(p[0].argmax()), int(p[1].argmax())), (int(p[0].argmin()), 1)]:
        probs = p[None].expand(rows, 3, vocab).contiguous()
        drafts = torch.tensor([[draft0, draft1]]).expand(rows, 2)
        result = verify(probs.argmax(-1), probs, drafts, torch.full((rows,), 2),
                        torch.zeros(rows, dtype=torch.bool), gen)
        first = torch.tensor([t[0] for t in result.token_ids])
        _check_against(first, p[0])
        second = torch.tensor([t[1] for t, a in zip(result.token_ids, result.num_accepted)
                               if a >= 1])
        assert second.numel() > 300
        _check_against(second, p[1])


def _check_against(samples: torch.Tensor, probs: torch.Tensor) -> None:
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    expected = probs.double() * samples.numel()
    stat = float(((counts - expected) ** 2 / expected).sum())
    assert stat < chi2_threshold(probs.numel() - 1), (counts, expected)


# -- engines on tiny models ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    return save_tiny_model(root / "target", "llama"), save_tiny_model(root / "draft", "llama", 1)


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    motif = torch.randint(3, 512, (6,), generator=gen).tolist()
    return [motif * 4, torch.randint(3, 512, (9,), generator=gen).tolist(), motif * 2 + [7, 8]]


def _tokens(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def test_tiny_model_greedy_is_identical_with_ngram_and_draft_speculation(tiny):
    target, draft = tiny
    plain = _tokens(LLM(str(target), device="cpu", progress=False), _prompts(), GREEDY)
    # (a random model seldom copies its prompt: unigram lookups make n-gram proposals happen)
    for spec in [{"method": "ngram", "prompt_lookup_min": 1},
                 {"method": "draft", "draft_model": str(draft)},
                 {"method": "draft", "draft_model": str(target), "num_speculative_tokens": 3}]:
        llm = LLM(str(target), device="cpu", progress=False, speculative=spec)
        assert _tokens(llm, _prompts(), GREEDY) == plain, spec
        alone = [_tokens(llm, [p], GREEDY)[0] for p in _prompts()]
        assert alone == plain, spec
        stats = llm.engine.snapshot().spec_decode
        assert stats.num_drafts > 0, spec
        assert sum(stats.accepted_per_pos) == stats.num_accepted_tokens
    # the target as its own draft: every proposal is the target's greedy token
    assert stats.acceptance_rate == 1.0


def test_speculation_under_preemption_and_a_small_token_budget(tiny):
    target, draft = tiny
    prompts = _prompts() * 2
    plain = _tokens(LLM(str(target), device="cpu", progress=False), prompts, GREEDY)
    # (async: the n-gram engine overlaps the steps with nothing to verify, then drains)
    for spec, overlap in [({"method": "ngram", "prompt_lookup_min": 1}, False),
                          ({"method": "ngram", "prompt_lookup_min": 1}, True),
                          ({"method": "draft", "draft_model": str(draft)}, False)]:
        llm = LLM(str(target), device="cpu", progress=False, num_kv_blocks=14, block_size=8,
                  max_num_batched_tokens=24, speculative=spec, async_scheduling=overlap)
        assert _tokens(llm, prompts, GREEDY) == plain
        snap = llm.engine.snapshot()
        assert snap.scheduler.num_preemptions > 0 and snap.spec_decode.num_drafts > 0
        assert snap.blocks.num_free == snap.blocks.num_blocks


def test_switches_off_above_its_batch_size_and_overlaps_those_steps(tiny):
    """Above disable_by_batch_size the steps run without proposals (asynchronously when async
    scheduling is on); below it they speculate: the output never changes."""
    target, _ = tiny
    prompts = _prompts() * 2
    params = [SamplingParams(temperature=0, max_tokens=8 * (i + 1), ignore_eos=True)
              for i in range(len(prompts))]
    plain = _tokens(LLM(str(target), device="cpu", progress=False), prompts, params)
    spec = SpeculativeConfig(prompt_lookup_min=1, disable_by_batch_size=2)
    llm = LLM(str(target), device="cpu", progress=False, async_scheduling=True, speculative=spec)
    assert _tokens(llm, prompts, params) == plain
    assert llm.engine.snapshot().spec_decode.num_drafts > 0


def test_steps_without_proposals_overlap_below_the_switch_off(tiny):
    """With async scheduling, a speculating engine waits only for the steps that verify: while
    no n-gram matches, steps overlap (runner.launch); when one matches, the pipeline drains and
    the step verifies (runner.execute). Greedy output never changes, alone or batched."""
    target, _ = tiny
    prompts = _prompts()
    plain = _tokens(LLM(str(target), device="cpu", progress=False), prompts, GREEDY)
    spec = SpeculativeConfig(prompt_lookup_min=1, prompt_lookup_max=2)
    llm = LLM(str(target), device="cpu", progress=False, async_scheduling=True, speculative=spec)
    runner, calls = llm.engine.runner, {"launch": 0, "verify": 0}
    launch, execute = runner.launch, runner.execute

    def counted_launch(schedule, prev):
        calls["launch"] += 1
        return launch(schedule, prev)

    def counted_execute(schedule, grammars=None):
        calls["verify"] += sum(bool(c.spec_token_ids) for c in schedule.chunks)
        return execute(schedule, grammars)

    runner.launch, runner.execute = counted_launch, counted_execute
    assert _tokens(llm, prompts, GREEDY) == plain
    assert [_tokens(llm, [p], GREEDY)[0] for p in prompts] == plain
    stats = llm.engine.snapshot().spec_decode
    assert calls["launch"] > 0 and calls["verify"] > 0 and stats.num_drafts == calls["verify"]
    snap = llm.engine.snapshot()
    assert snap.blocks.num_free == snap.blocks.num_blocks


def test_sampling_distribution_is_unchanged_by_speculation(tiny):
    """Temperature with top-k 3: the joint distribution of the 2nd and 3rd tokens (the speculated
    ones) with a draft model is the plain engine's (two-sample chi-square, p = 0.001)."""
    target, _ = tiny
    prompt = _prompts()[0]
    params = SamplingParams(temperature=0.8, top_k=3, max_tokens=3, ignore_eos=True)
    n = 1200

    def joint(llm: LLM) -> dict:
        counts: dict = {}
        for tokens in _tokens(llm, [prompt] * n, params):
            counts[tuple(tokens[1:])] = counts.get(tuple(tokens[1:]), 0) + 1
        return counts

    plain = joint(LLM(str(target), device="cpu", progress=False, seed=1))
    spec = {"method": "draft", "draft_model": str(target), "disable_by_batch_size": n}
    llm = LLM(str(target), device="cpu", progress=False, seed=2, speculative=spec)
    speculated = joint(llm)
    stats = llm.engine.snapshot().spec_decode
    assert stats.num_drafts >= n and 0 < stats.acceptance_rate < 1
    stat, dof = chi2_two_sample(plain, speculated)
    assert stat < chi2_threshold(dof), (plain, speculated)


def test_bad_speculative_settings_are_refused(tiny):
    with pytest.raises(ValueError, match="needs a draft model"):
        SpeculativeConfig(method="draft")
    with pytest.raises(ValueError, match="must be one of"):
        SpeculativeConfig(method="medusa")
    with pytest.raises(ValueError, match="unknown speculative settings"):
        SpeculativeConfig.parse({"k": 3})
    target, _ = tiny
    with pytest.raises(ValueError, match="vocabulary"):
        LLM(str(target), device="cpu", progress=False,
            speculative={"method": "draft", "draft_model": "smollm2-135m-instruct"})


def test_k_defaults_to_the_devices_row_tile(tiny):
    """No K given: 3 on a CPU in 16-bit (the int4 GEMV and the int8 head take 4 rows for about
    the price of one, a fifth row doubles it), 4 in float32, 8 for n-grams on a GPU (a
    verification costs about one replay whatever its rows); a given K is kept."""
    assert SpeculativeConfig().for_device("cpu", float32=False).num_speculative_tokens == 3
    assert SpeculativeConfig().for_device("cpu", float32=True).num_speculative_tokens == 4
    assert SpeculativeConfig().for_device("cuda", float32=False).num_speculative_tokens == 8
    draft = SpeculativeConfig(method="draft", draft_model="d")
    assert draft.for_device("cuda", float32=False).num_speculative_tokens == 4
    given = SpeculativeConfig(num_speculative_tokens=6)
    assert given.for_device("cpu", float32=False) is given
    with pytest.raises(ValueError, match="positive integer"):
        SpeculativeConfig(num_speculative_tokens=0)
    target, _ = tiny
    for dtype, k in (("float32", 4), ("bfloat16", 3)):
        llm = LLM(str(target), device="cpu", dtype=dtype, progress=False, speculative="ngram")
        assert llm.engine.config.speculative.num_speculative_tokens == k
        assert llm.engine.snapshot().spec_decode.num_speculative_tokens == k


# -- the default model --------------------------------------------------------------------------

CODE = '''def mean(values):
    total = 0
    for value in values:
        total += value
    return total / len(values)
'''


def test_default_model_greedy_is_identical_with_ngram_speculation():
    llm = LLM(device="cpu", dtype="float32", progress=False)
    messages = [{"role": "user", "content": "Repeat this code exactly:\n" + CODE}]
    prompt = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    params = SamplingParams(temperature=0, max_tokens=48)
    plain = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    llm.shutdown()
    spec = LLM(device="cpu", dtype="float32", progress=False, speculative="ngram")
    out = spec.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == plain.token_ids and out.text == plain.text
    stats = spec.engine.snapshot().spec_decode
    assert stats.acceptance_rate > 0.3, stats  # the answer copies the prompt
