"""Grammar-constrained decoding on a CUDA GPU: the bitmask op on the device equals the reference,
constrained greedy tokens equal the CPU path's (float32, CUDA graphs on), unconstrained requests
keep their tokens beside constrained ones, seeded constrained sampling is reproducible, and a
preempted constrained request rebuilds its matcher.

Marked `gpu`: conftest skips them on a machine without CUDA. No timing here (bench/structured.py).
"""

from __future__ import annotations

import gc
import json
import re

import pytest
import torch
from helpers import save_tiny_model

from hearth import LLM, SamplingParams
from hearth.engine.logits_processors import apply_token_bitmask, apply_token_bitmask_ref
from hearth.engine.structured_output import StructuredOutput

pytestmark = pytest.mark.gpu
KV_GIB = 0.25
SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "n": {"type": "integer", "minimum": 0, "maximum": 999},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "n", "tags"], "additionalProperties": False}
SPECS = [StructuredOutput(json=SCHEMA), StructuredOutput(regex=r"[0-9]{3}-[a-f]{4}"),
         StructuredOutput(choice=("alpha", "beta", "gamma")), StructuredOutput(json_object=True)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def _prompts(n: int, length: int = 12) -> list[list[int]]:
    gen = torch.Generator().manual_seed(n)
    return [torch.randint(3, 500, (length,), generator=gen).tolist() for _ in range(n)]


def _ids(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def _free(llm: LLM) -> None:
    llm.shutdown()
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, vocab", [(1, 49152), (64, 151936), (7, 1000)])
def test_bitmask_on_cuda_equals_reference(rows, vocab, dtype):
    gen = torch.Generator().manual_seed(rows)
    logits = torch.randn(rows, vocab + 64, generator=gen).to(dtype)  # padded LM-head columns
    words = -(-vocab // 32)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (rows, words), dtype=torch.int32, generator=gen)
    want = apply_token_bitmask_ref(logits[:, :32 * words].float(), bitmask) if vocab < 2000 \
        else None
    got = logits.cuda()
    apply_token_bitmask(got, bitmask.cuda())
    got = got.cpu()
    allowed = ((bitmask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).view(rows, -1)
    width = min(logits.shape[1], 32 * words)
    assert torch.equal(torch.isinf(got[:, :width]), allowed[:, :width] == 0)
    assert torch.equal(got[:, :width][allowed[:, :width] == 1],
                       logits[:, :width][allowed[:, :width] == 1])
    assert torch.equal(got[:, width:], logits[:, width:])
    if want is not None:
        torch.testing.assert_close(got[:, :32 * words].float(), want, rtol=0, atol=0)


def test_constrained_greedy_tokens_equal_the_cpu_path(model_dir):
    prompts = _prompts(len(SPECS))
    params = [SamplingParams(temperature=0, max_tokens=64, structured_output=s) for s in SPECS]
    cpu = LLM(str(model_dir), device="cpu", dtype="float32", progress=False)
    want = _ids(cpu.generate(prompts, params, use_tqdm=False))
    cpu.shutdown()
    gpu = LLM(str(model_dir), device="cuda", dtype="float32", progress=False, kv_cache_gib=KV_GIB)
    outs = gpu.generate(prompts, params, use_tqdm=False)
    assert _ids(outs) == want
    for spec, out in zip(SPECS, outs):
        sample = out.outputs[0]
        if sample.finish_reason != "stop":
            continue
        if spec.regex:
            assert re.fullmatch(spec.regex, sample.text)
        elif spec.choice:
            assert sample.text in spec.choice
        else:
            assert isinstance(json.loads(sample.text), dict)
    _free(gpu)


def test_unconstrained_tokens_unchanged_beside_constrained_on_cuda(model_dir):
    llm = LLM(str(model_dir), device="cuda", dtype="float32", progress=False, kv_cache_gib=KV_GIB)
    prompts = _prompts(6)
    free = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    alone = _ids(llm.generate(prompts[:3], free, use_tqdm=False))  # async scheduling, graphs
    mixed = llm.generate(prompts, [free] * 3 + [SamplingParams(temperature=0, max_tokens=32,
                                                               structured_output=s)
                                                for s in SPECS[:3]], use_tqdm=False)
    assert _ids(mixed[:3]) == alone
    _free(llm)


def test_seeded_constrained_sampling_reproducible_on_cuda(model_dir):
    llm = LLM(str(model_dir), device="cuda", dtype="float32", progress=False, kv_cache_gib=KV_GIB)
    seeded = SamplingParams(temperature=1.0, seed=11, max_tokens=48,
                            structured_output=StructuredOutput(json=SCHEMA))
    prompts = _prompts(4)
    alone = _ids(llm.generate(prompts[:1], seeded, use_tqdm=False))[0]
    other = SamplingParams(temperature=1.0, max_tokens=48, ignore_eos=True)
    batch = llm.generate(prompts, [other, seeded, other, other], use_tqdm=False)
    again = llm.generate([prompts[0]], [seeded], use_tqdm=False)
    assert _ids(again)[0] == alone == batch[1].outputs[0].token_ids
    _free(llm)


def test_preempted_constrained_requests_on_cuda(model_dir):
    prompts = _prompts(6, length=40)
    params = SamplingParams(temperature=0, max_tokens=40,
                            structured_output=StructuredOutput(
                                json={"type": "array", "items": {"type": "string"}}))
    roomy = LLM(str(model_dir), device="cuda", dtype="float32", progress=False,
                kv_cache_gib=KV_GIB)
    want = _ids(roomy.generate(prompts, params, use_tqdm=False))
    _free(roomy)
    tight = LLM(str(model_dir), device="cuda", dtype="float32", progress=False, num_kv_blocks=12,
                block_size=16)
    assert _ids(tight.generate(prompts, params, use_tqdm=False)) == want
    assert tight.engine.scheduler.num_preemptions > 0 and tight.engine._matchers.num_rebuilds > 0
    _free(tight)
