"""Speculative decoding on a CUDA GPU: with CUDA graphs captured (decode-only steps replay them;
verification steps over K + 1 positions replay verification graphs; a draft model's decode
rounds replay its own graphs) and async scheduling on (steps above the switch-off batch size
overlap), greedy output is token-identical to the plain engine's, on the default model and a
tiny model.

Marked `gpu`: conftest skips them without CUDA. No timing here (bench/spec.py does that).
"""

from __future__ import annotations

import gc

import pytest
import torch
from helpers import save_tiny_model

from hearth import LLM, SamplingParams

pytestmark = pytest.mark.gpu
KV_GIB = 0.5  # float32 at the default model's 8192-token context needs 0.38 GiB for one sequence

CODE = '''def read_config(path):
    with open(path) as handle:
        lines = handle.read().splitlines()
    config = {}
    for line in lines:
        key, value = line.split("=", 1)
        config[key.strip()] = value.strip()
    return config
'''


def _tokens(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _free(llm: LLM) -> None:
    llm.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def _copy_prompts(llm: LLM, n: int) -> list[str]:
    tasks = ["Repeat this code exactly:\n", "Add type hints to this code:\n",
             "Rename the variables in this code:\n"]
    return [llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": tasks[i % 3] + CODE}], add_generation_prompt=True)
        for i in range(n)]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_default_model_greedy_identical_with_ngram_graphs_and_async(dtype):
    params = SamplingParams(temperature=0, max_tokens=96)
    plain = LLM(device="cuda", dtype=dtype, kv_cache_gib=KV_GIB, progress=False)
    assert plain.engine.runner.graphs is not None  # CUDA graphs captured
    prompts = _copy_prompts(plain, 12)
    want = _tokens(plain, prompts, params)
    want_alone = _tokens(plain, prompts[:1], params)
    _free(plain)
    spec = LLM(device="cuda", dtype=dtype, kv_cache_gib=KV_GIB, progress=False,
               speculative={"method": "ngram", "disable_by_batch_size": 4})
    assert spec.engine._async  # steps above 4 running sequences overlap
    assert spec.engine.runner.verify_graphs is not None  # speculating steps replay graphs
    assert spec.engine.runner.verify_graphs.sizes == [1, 2, 4]
    alone = _tokens(spec, prompts[:1], params)
    got = _tokens(spec, prompts, params)  # 12 running: async steps, then speculating ones
    if dtype == "float32":
        assert alone == want_alone and got == want
    else:
        # bf16: verification reads K + 1 positions through the prefill kernel, plain decoding one
        # through the decode kernel; a near-tie may round the other way (vLLM has the same).
        assert sum(a == b for a, b in zip(got, want)) >= 10, (got, want)
    stats = spec.engine.snapshot().spec_decode
    assert stats.num_drafts > 0 and stats.acceptance_rate > 0.3
    _free(spec)


def test_default_model_as_its_own_draft_on_the_gpu():
    params = SamplingParams(temperature=0, max_tokens=64)
    plain = LLM(device="cuda", dtype="float32", kv_cache_gib=KV_GIB, progress=False)
    prompts = _copy_prompts(plain, 3)
    want = _tokens(plain, prompts, params)
    _free(plain)
    spec = LLM(device="cuda", dtype="float32", kv_cache_gib=KV_GIB, progress=False,
               speculative={"method": "draft", "draft_model": "smollm2-135m-instruct",
                            "num_speculative_tokens": 5})
    assert spec.engine._speculator.draft.runner.graphs is not None
    assert _tokens(spec, prompts, params) == want
    assert spec.engine.snapshot().spec_decode.acceptance_rate > 0.9  # its own greedy tokens
    _free(spec)


def test_tiny_model_with_draft_under_preemption_on_the_gpu(tmp_path):
    target = save_tiny_model(tmp_path / "t", "qwen3")
    draft = save_tiny_model(tmp_path / "d", "qwen3", seed=1)
    gen = torch.Generator().manual_seed(0)
    motif = torch.randint(3, 512, (5,), generator=gen).tolist()
    prompts = [motif * 5, motif * 3 + [9], torch.randint(3, 512, (20,), generator=gen).tolist()]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    kw = dict(device="cuda", dtype="float32", num_kv_blocks=16, block_size=8, progress=False)
    want = _tokens(LLM(str(target), **kw), prompts * 2, params)
    for spec in [{"method": "ngram", "prompt_lookup_min": 1},
                 {"method": "draft", "draft_model": str(draft)}]:
        llm = LLM(str(target), speculative=spec, **kw)
        assert _tokens(llm, prompts * 2, params) == want, spec
        assert llm.engine.snapshot().scheduler.num_preemptions > 0
        _free(llm)


def test_sampled_requests_speculate_on_the_gpu():
    """Rejection sampling runs on the device: seeded-free temperature requests complete with
    proposals verified (the distribution itself is checked on CPU, tests/test_speculative.py)."""
    llm = LLM(device="cuda", kv_cache_gib=KV_GIB, progress=False, speculative="ngram")
    prompts = _copy_prompts(llm, 4)
    outs = llm.generate(prompts, SamplingParams(temperature=0.7, top_p=0.95, max_tokens=64),
                        use_tqdm=False)
    assert all(o.outputs[0].token_ids for o in outs)
    assert llm.engine.snapshot().spec_decode.num_drafts > 0
    _free(llm)
