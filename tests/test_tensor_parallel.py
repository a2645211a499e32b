"""Tensor parallelism on CPU: two gloo processes give the greedy tokens of one process and of
transformers (tiny Llama, Qwen3, Mistral with its window, Gemma 2 with soft-caps; the default
model; GPTQ and AWQ int4 split on group boundaries); the partition and weight-cutting rules; a
killed worker stops the engine with a clear error and leaves no process behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest
import torch
from helpers import DEFAULT_GGUF, default_model_dir, save_tiny_model
from safetensors.torch import load_file, save_file

from hearth import LLM, SamplingParams
from hearth.appliance.tools.quantizer.algorithms import rtn
from hearth.engine.distributed.partition import make_partition, split_range
from hearth.engine.distributed.shard_weights import shard_weights
from hearth.engine.model_config import ModelConfig
from hearth.engine.quantization import awq, gptq
from hearth.engine.quantization.config import QuantConfig

PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
KV_GIB = 0.03  # per rank; the shared test machine is short of RAM
PROMPTS = [[5, 6, 7, 8, 9], list(range(10, 33)), [300, 2, 77]]


def _config(heads=9, kv=3, inter=1536, vocab=49152, arch="LlamaForCausalLM", quant=None):
    return ModelConfig(arch, vocab, 576, inter, 2, heads, kv, 64, quantization=quant)


def test_split_range_gives_contiguous_pieces_first_ones_larger():
    assert [split_range(9, 2, r) for r in range(2)] == [(0, 5), (5, 4)]
    assert [split_range(1536, 2, r, 64) for r in range(2)] == [(0, 768), (768, 768)]
    assert [split_range(192, 2, r, 64) for r in range(2)] == [(0, 128), (128, 64)]


def test_default_model_shape_splits_by_kv_groups():
    # 9 heads over 3 KV heads: rank 0 takes 2 groups (6 heads), rank 1 one group (3 heads)
    p0, p1 = (make_partition(_config(), r, 2) for r in range(2))
    assert (p0.heads, p0.kv_heads, p1.heads, p1.kv_heads) == ((0, 6), (0, 2), (6, 3), (2, 1))
    assert (p0.vocab, p1.vocab, p0.intermediate) == ((0, 24576), (24576, 24576), (0, 768))
    local = p1.local_config(_config())
    assert (local.num_heads, local.num_kv_heads, local.vocab_size) == (3, 1, 24576)


def test_fewer_kv_heads_than_ranks_are_replicated():
    parts = [make_partition(_config(heads=8, kv=2), r, 4) for r in range(4)]
    assert [p.kv_heads for p in parts] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    assert [p.heads for p in parts] == [(0, 2), (2, 2), (4, 2), (6, 2)]
    with pytest.raises(ValueError, match="cannot be replicated over 3 ranks"):
        make_partition(_config(heads=8, kv=2), 0, 3)


def test_unsupported_architecture_and_odd_vocab():
    with pytest.raises(ValueError, match="Phi3ForCausalLM runs with tensor_parallel_size 1"):
        make_partition(_config(arch="Phi3ForCausalLM"), 0, 2)
    p1 = make_partition(_config(vocab=49153), 1, 2)
    assert p1.vocab == (24577, 24577)  # padded: both ranks hold the same rows
    weight = torch.randn(49153, 4)
    [(_, piece)] = shard_weights([("lm_head.weight", weight)], _config(vocab=49153), p1)
    assert piece.shape == (24577, 4) and torch.equal(piece[:-1], weight[24577:])
    assert not piece[-1].any()


def test_quantized_row_split_off_group_boundaries_is_refused():
    quant = QuantConfig("gptq", 4, 128)
    config = _config(heads=9, kv=3, quant=quant)
    part = make_partition(config, 1, 2)  # o_proj inputs 384..576: not whole 128-groups
    tensors = [("model.layers.0.self_attn.o_proj.scales", torch.zeros(4, 576))]
    with pytest.raises(ValueError, match="do not fall on the 128-input quantization groups"):
        list(shard_weights(tensors, config, part))
    with pytest.raises(ValueError, match="whole 1024-column groups"):
        make_partition(config, 0, 2, mlp_unit=1024)


def _greedy(path, tp: int, **kwargs) -> list[list[int]]:
    llm = LLM(str(path), device="cpu", dtype="float32", progress=False, kv_cache_gib=KV_GIB,
              tensor_parallel_size=tp, **kwargs)
    try:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]
    finally:
        llm.shutdown()


def _hf_greedy(path) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    outs = []
    for ids in PROMPTS:
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                               max_new_tokens=PARAMS.max_tokens, min_new_tokens=PARAMS.max_tokens,
                               pad_token_id=0)
        outs.append(y[0, len(ids):].tolist())
    return outs


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral", "gemma2"])
def test_tp2_matches_tp1_and_transformers(tmp_path, arch):
    path = save_tiny_model(tmp_path / arch, arch)
    tp2 = _greedy(path, 2)
    assert tp2 == _hf_greedy(path)
    assert tp2 == _greedy(path, 1)


def _quantized(tiny, dst, method: str):
    tensors, out = load_file(tiny / "model.safetensors"), {}
    for name, t in tensors.items():
        module = name.removesuffix(".weight")
        if not module.endswith(("_proj",)):
            out[name] = t
            continue
        r = rtn(t.float(), 4, 32, sym=False)
        if method == "gptq":
            k = t.shape[1]
            g_idx = torch.arange(k, dtype=torch.int32) // 32
            pieces = gptq.quantized_to_checkpoint(r.q, r.zeros.clamp(1, 15), r.scales, g_idx)
        else:
            pieces = awq.quantized_to_checkpoint(r.q, r.zeros, r.scales)
        out.update({f"{module}.{k}": v for k, v in pieces.items()})
    dst.mkdir()
    save_file(out, dst / "model.safetensors")
    config = json.loads((tiny / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4, "group_size": 32,
                                     "sym": False, "version": "gemm"}
    (dst / "config.json").write_text(json.dumps(config))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny / f, dst / f)
    return dst


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_tp2_int4_split_on_group_boundaries(tmp_path, method):
    path = _quantized(save_tiny_model(tmp_path / "llama", "llama"), tmp_path / method, method)
    assert _greedy(path, 2) == _greedy(path, 1)


def test_default_model_tp2_matches_tp1():
    prompts = ["The capital of France is", "def fibonacci(n):"]
    params = SamplingParams(temperature=0, max_tokens=16)
    outs = {}
    for tp in (1, 2):
        llm = LLM(device="cpu", dtype="float32", progress=False, tensor_parallel_size=tp,
                  max_model_len=256, kv_cache_gib=KV_GIB)
        try:
            outs[tp] = [o.outputs[0].token_ids for o in llm.generate(prompts, params,
                                                                      use_tqdm=False)]
        finally:
            llm.shutdown()
    assert outs[2] == outs[1]
    assert default_model_dir().joinpath(DEFAULT_GGUF).is_file()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone but for its parent's wait
        return f.read().split(")")[-1].split()[0] != "Z"


def test_killed_worker_stops_the_engine_with_a_clear_error(tmp_path, caplog):
    path = save_tiny_model(tmp_path / "llama", "llama")
    llm = LLM(str(path), device="cpu", dtype="float32", progress=False, tensor_parallel_size=2,
              kv_cache_gib=KV_GIB)
    workers = llm.engine.runner.workers
    [pid] = workers.pids
    try:
        assert len(llm.generate(PROMPTS[:1], PARAMS, use_tqdm=False)) == 1
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while workers.failure is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "tensor-parallel worker rank 1" in workers.failure
        assert "exited with code -9" in workers.failure
        with pytest.raises(RuntimeError, match="tensor-parallel worker rank 1"):
            llm.engine.check_health()
        with pytest.raises(RuntimeError, match="tensor-parallel worker rank 1"):
            llm.generate(PROMPTS[:1], PARAMS, use_tqdm=False)
    finally:
        llm.shutdown()
    assert not _alive(pid)
