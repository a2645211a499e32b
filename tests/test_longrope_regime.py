"""Phi-3 long-context RoPE ("longrope") per sequence, as transformers runs it: a sequence of at
most `original_max_position_embeddings` (64 here) tokens rotates with the short factors; a longer
one rotates every position with the long factors, and one that grows past 64 while generating
has its keys computed again (transformers' Phi-3 drops its cache at that length).

Greedy tokens equal transformers' for prompts below, at and past the switch, with the window off
(so positions far back matter) and on, batched, alone, chunked, with prefix-cache hits in either
regime, with async scheduling, under n-gram speculation, and in the Triton attention backend run
by the interpreter. The scheduler and block-manager rules are also tested alone (no model).
"""

from __future__ import annotations

import pytest
import torch
from helpers import save_tiny_model
from test_engine_equivalence import _hf_greedy

from hearth import LLM, SamplingParams
from hearth.engine.block_manager import BlockManager
from hearth.engine.config import SchedulerConfig
from hearth.engine.outputs import RunnerOutput
from hearth.engine.sampling_params import SamplingParams as Params
from hearth.engine.scheduler import Scheduler
from hearth.engine.sequence import Sequence

SWITCH = 64
NEW = 20
PARAMS = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)


def _prompts() -> list[list[int]]:
    """50 (crosses 64 after 14 new tokens), 64 (at its first new token), 63, 65 and 100 (long from
    the start; its first 50 tokens are the 50-token prompt's, so the short blocks that prompt
    cached must not serve it), and 7 (never long)."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randint(3, 512, (100,), generator=gen).tolist()
    other = torch.randint(3, 512, (65,), generator=gen).tolist()
    return [base[:50], other[:64], other[:63], other, base, other[:7]]


@pytest.fixture(scope="module", params=[None, 12], ids=["no-window", "window-12"])
def phi3(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = save_tiny_model(tmp_path_factory.mktemp("phi3") / "hf", "phi3",
                           sliding_window=request.param)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    want = _hf_greedy(hf, _prompts(), NEW, None)
    # generate's cache handling at the switch (5.25) equals a full forward pass every step
    assert want[:2] == _hf_recompute(hf, _prompts()[:2], NEW)
    return path, want


def _hf_recompute(model, prompts, max_new):
    outs = []
    for ids in prompts:
        seq = list(ids)
        with torch.no_grad():
            for _ in range(max_new):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        outs.append(seq[len(ids):])
    return outs


def _tokens(llm: LLM, prompts) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS, use_tqdm=False)]


def _llm(path, **kwargs) -> LLM:
    return LLM(str(path), device="cpu", dtype="float32", progress=False, block_size=8, **kwargs)


def test_greedy_matches_transformers_across_the_switch(phi3):
    path, want = phi3
    llm = _llm(path)
    assert _tokens(llm, _prompts()) == want  # batched
    assert _tokens(llm, _prompts()) == want  # again: prefix-cache hits in both regimes
    assert [_tokens(llm, [p])[0] for p in _prompts()] == want  # alone
    assert llm.engine.scheduler.num_preemptions == 0  # a recompute is not a preemption
    snap = llm.engine.snapshot()
    assert snap.blocks.num_free == snap.blocks.num_blocks  # nothing leaked


def test_chunked_async_and_speculative_runs_match(phi3):
    path, want = phi3
    assert _tokens(_llm(path, max_num_batched_tokens=7), _prompts()) == want
    assert _tokens(_llm(path, async_scheduling=True), _prompts()) == want
    spec = _llm(path, speculative={"method": "ngram", "prompt_lookup_min": 1})
    assert _tokens(spec, _prompts()) == want
    assert spec.engine.snapshot().spec_decode.num_drafts > 0


def test_triton_attention_backend_in_interpreter(phi3, monkeypatch):
    """The CUDA path indexes the rotary table's long half inside the attention kernels."""
    from hearth.engine import model_builder, model_runner
    from hearth.engine.triton_attention import TritonAttention

    for module in (model_runner, model_builder):
        monkeypatch.setattr(module, "make_attention_backend", lambda device: TritonAttention())
    path, want = phi3
    llm = _llm(path, max_num_batched_tokens=32)
    assert isinstance(llm.engine.runner.backend, TritonAttention)
    prompts = _prompts()
    picked = [0, 3]  # crosses while generating; long from the start
    assert _tokens(llm, [prompts[i] for i in picked]) == [want[i] for i in picked]


# -- the rules alone ------------------------------------------------------------------------------

def _scheduler(switch: int | None, num_blocks: int = 64) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=256, max_model_len=512,
                             block_size=4, rope_switch=switch)
    return Scheduler(config, BlockManager(num_blocks, 4, True), eos_token_ids=[2])


def _step(sched: Scheduler, token: int = 9):
    out = sched.schedule()
    result = RunnerOutput()
    for chunk in out.chunks:
        if chunk.samples:
            result.sampled_token_ids[chunk.seq.seq_id] = [token]
    sched.update(out, result)
    return out


def _seq(seq_id: int, n: int) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", list(range(3, 3 + n)),
                    Params(temperature=0, max_tokens=20, ignore_eos=True))


def test_scheduler_recomputes_a_sequence_once_at_the_switch():
    sched = _scheduler(switch=10)
    seq = _seq(0, 9)
    sched.add(seq)
    assert _step(sched).chunks[0].num_new_tokens == 9 and not seq.rope_long  # 10 tokens now
    assert _step(sched).chunks[0].num_new_tokens == 1 and not seq.rope_long  # 11 tokens now
    chunk = _step(sched).chunks[0]  # 11 > 10: every token again, with the long factors
    assert (chunk.start_pos, chunk.num_new_tokens, seq.rope_long) == (0, 11, True)
    assert _step(sched).chunks[0].num_new_tokens == 1  # then decoding as before
    assert sched.num_preemptions == 0 and seq.num_computed_tokens == 12


def test_scheduler_admits_long_prompts_long_and_ignores_other_models():
    sched = _scheduler(switch=10)
    seq = _seq(0, 11)
    sched.add(seq)
    chunk = _step(sched).chunks[0]
    assert seq.rope_long and chunk.num_new_tokens == 11
    plain = _scheduler(switch=None)
    seq = _seq(1, 11)
    plain.add(seq)
    _step(plain)
    assert not seq.rope_long


def test_speculation_stops_short_of_the_switch():
    sched = _scheduler(switch=10)
    seq = _seq(0, 7)
    sched.add(seq)
    _step(sched)  # 8 tokens, 7 computed
    seq.spec_token_ids = [5, 5, 5, 5]
    chunk = sched.schedule().chunks[0]
    assert chunk.spec_token_ids == (5, 5)  # positions 8 and 9: tokens 9 and 10, still short


def test_prefix_cache_keeps_the_regimes_apart():
    blocks = BlockManager(16, 4, True)
    short, long = _seq(0, 9), _seq(1, 9)
    long.rope_long = True
    for seq in (short, long):
        assert blocks.match_prefix(seq).num_tokens == 0
        blocks.allocate(seq, 9)
        seq.num_computed_tokens = 9
        blocks.cache_blocks(seq, 0)
    again_short, again_long = _seq(2, 9), _seq(3, 9)
    again_long.rope_long = True
    assert blocks.match_prefix(again_short).block_ids == tuple(short.block_ids[:2])
    assert blocks.match_prefix(again_long).block_ids == tuple(long.block_ids[:2])


def test_recompute_under_a_tight_cache_preempts_and_leaks_nothing(phi3):
    """Three of four sequences cross the switch while 24 blocks of 8 hold them (35 needed
    without a window): a recompute needs a whole sequence's blocks at once, so others are
    preempted; every answer is still transformers', and every block comes back."""
    path, want = phi3
    prompts = _prompts()
    picked = [0, 1, 2, 5]  # 50, 64, 63 and 7 tokens: the first three cross 64 while generating
    llm = _llm(path, num_kv_blocks=24, max_num_batched_tokens=32)
    assert _tokens(llm, [prompts[i] for i in picked]) == [want[i] for i in picked]
    snap = llm.engine.snapshot()
    assert snap.blocks.num_free == snap.blocks.num_blocks
    windowed = llm.engine.model_config.sliding_window is not None
    assert windowed or llm.engine.scheduler.num_preemptions > 0
