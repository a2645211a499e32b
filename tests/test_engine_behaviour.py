"""Engine behaviour on a tiny real model: n > 1, prefix caching, preemption, stops, seeds, abort."""

from __future__ import annotations

import pytest
import torch
from helpers import save_tiny_model

from hearth import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def _llm(model_dir, **kw) -> LLM:
    kw.setdefault("device", "cpu")
    kw.setdefault("dtype", "float32")
    return LLM(str(model_dir), progress=False, **kw)


def _prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (length,), generator=gen).tolist() for _ in range(n)]


def _all_blocks_free(llm: LLM) -> bool:
    snap = llm.engine.snapshot()
    return snap.blocks.num_used == 0 and snap.scheduler.num_running == 0


def test_n_samples_share_prompt_blocks_and_match_separate_seeded_runs(model_dir):
    llm = _llm(model_dir)
    prompt = _prompts(1, 21)[0]  # a partial last block: the fork copies it on write
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 12 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    again = llm.generate([prompt], params, use_tqdm=False)[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in out.outputs]
    assert _all_blocks_free(llm)


def test_greedy_n2_gives_identical_samples(model_dir):
    llm = _llm(model_dir)
    out = llm.generate(_prompts(1, 30), SamplingParams(n=2, temperature=0, max_tokens=10,
                                                       ignore_eos=True), use_tqdm=False)[0]
    alone = llm.generate(_prompts(1, 30), GREEDY, use_tqdm=False)[0].outputs[0].token_ids[:10]
    assert out.outputs[0].token_ids == out.outputs[1].token_ids == alone


def test_shared_prefix_computes_only_new_tokens(model_dir):
    llm = _llm(model_dir, block_size=16)
    prefix = _prompts(1, 64, seed=3)[0]
    first = llm.generate([prefix + [7, 8, 9]], GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    engine = llm.engine
    computed = []
    real_execute = engine.runner.execute

    def spy(schedule, *args):
        computed.append(schedule.num_batched_tokens)
        return real_execute(schedule, *args)

    engine.runner.execute = spy
    second = llm.generate([prefix + [10, 11, 12, 13]], GREEDY, use_tqdm=False)[0]
    assert second.num_cached_tokens == 64
    assert computed[0] == 4  # the prefill step computed only the 4 new prompt tokens
    fresh = _llm(model_dir, block_size=16, enable_prefix_caching=False)
    want = fresh.generate([prefix + [10, 11, 12, 13]], GREEDY, use_tqdm=False)[0]
    assert second.outputs[0].token_ids == want.outputs[0].token_ids


def test_preemption_under_block_pressure_gives_same_tokens(model_dir):
    prompts = _prompts(6, 40, seed=4)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    roomy = _llm(model_dir).generate(prompts, params, use_tqdm=False)
    tight = _llm(model_dir, num_kv_blocks=12, block_size=16)  # 6 seqs need 30 blocks at the end
    outs = tight.generate(prompts, params, use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in roomy]
    assert _all_blocks_free(tight)


def test_seeded_sampling_reproducible_alone_and_in_batch(model_dir):
    llm = _llm(model_dir)
    prompts = _prompts(4, 12, seed=6)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=123, max_tokens=12, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    alone = llm.generate([prompts[0]], seeded, use_tqdm=False)[0].outputs[0].token_ids
    batch = llm.generate(prompts, [other, other, seeded, other], use_tqdm=False)
    moved = llm.generate([prompts[0]] + prompts[1:], [seeded, other, other, other], use_tqdm=False)
    assert moved[0].outputs[0].token_ids == alone
    assert batch[2].outputs[0].token_ids != alone or prompts[2] == prompts[0]


def test_stop_token_ids_and_max_tokens_finish_reasons(model_dir):
    llm = _llm(model_dir)
    prompt = _prompts(1, 9, seed=7)[0]
    free = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 16
    stop_at = free.token_ids[5]
    first = free.token_ids.index(stop_at)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                stop_token_ids=[stop_at]), use_tqdm=False)
    o = out[0].outputs[0]
    assert o.finish_reason == "stop" and o.stop_reason == stop_at
    assert o.token_ids == free.token_ids[: first + 1]


def test_stop_string_spanning_tokens_is_cut_from_text(model_dir):
    llm = _llm(model_dir)
    prompt = _prompts(1, 9, seed=8)[0]
    free = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0]
    text = free.text
    # Two printable ASCII characters in a row: one byte-level token each, so the stop string
    # spans two tokens.
    starts = [i for i in range(1, len(text) - 1) if text[i : i + 2].isascii()
              and text[i : i + 2].isprintable()]
    assert starts, text
    stop = text[starts[0] : starts[0] + 2]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]


def test_abort_frees_blocks_at_once(model_dir):
    llm = _llm(model_dir)
    engine = llm.engine
    for i, p in enumerate(_prompts(3, 50, seed=9)):
        engine.add_request(f"r{i}", p, GREEDY)
    engine.step()
    assert engine.snapshot().blocks.num_used > 0
    for i in range(3):
        engine.abort_request(f"r{i}")
    assert _all_blocks_free(llm) and not engine.has_unfinished_requests()
    assert engine.step() == []


def test_priority_runs_urgent_request_first(model_dir):
    llm = _llm(model_dir, max_num_seqs=1)
    prompts = _prompts(3, 8, seed=10)
    order = []
    engine = llm.engine
    for i, (p, prio) in enumerate(zip(prompts, [5, 0, 5])):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=2), prio)
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["r1", "r0", "r2"]


def test_overlapped_steps_give_the_same_tokens_as_synchronous_steps(model_dir):
    """Async scheduling (on by default only on CUDA) forced on for the CPU: same tokens, same
    finish reasons (a stop token found a step late), every block back."""
    prompts = _prompts(3, 20, seed=11)
    free = _llm(model_dir).generate(prompts, GREEDY, use_tqdm=False)
    stop_id = free[2].outputs[0].token_ids[4]
    params = [GREEDY,
              SamplingParams(temperature=0.8, seed=3, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_id])]
    results = []
    for overlap in (False, True):
        llm = _llm(model_dir, async_scheduling=overlap)
        outs = llm.generate(prompts, params, use_tqdm=False)
        results.append([(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs])
        assert _all_blocks_free(llm)
    assert results[0] == results[1]
    assert results[1][2][1] == "stop"


def test_keyed_requests_join_fair_share_flows_and_keep_their_tokens(model_dir):
    from dataclasses import replace

    llm = _llm(model_dir, max_num_seqs=2)
    engine = llm.engine
    prompts = _prompts(6, 20, seed=7)
    for i, prompt in enumerate(prompts):  # the serving layer sets the key from the API key
        request = replace(engine.prepare(prompt, GREEDY), share_key="heavy" if i < 4 else "light")
        engine.add_prepared(f"r{i}", request)
    finished_order, tokens = [], {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished_order.append(out.request_id)
                tokens[out.request_id] = out.outputs[0].token_ids
    assert finished_order.index("r4") < finished_order.index("r3")  # light's first overtakes
    plain = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [tokens[f"r{i}"] for i in range(6)] == [o.outputs[0].token_ids for o in plain]
    served = engine.scheduler.fair_share.served_tokens()
    assert served["light"] == 2 * (20 + 16) and served["heavy"] == 4 * (20 + 16)
    assert _all_blocks_free(llm)
