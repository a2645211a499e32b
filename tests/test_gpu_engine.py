"""The engine on a CUDA GPU: Triton attention, fused layers and decode CUDA graphs against
transformers on the same random tiny checkpoints.

Marked `gpu`: conftest skips them on a machine without CUDA. No timing here (bench/ does that).
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_model

from hearth import LLM, SamplingParams

pytestmark = pytest.mark.gpu
KV_GIB = 0.25  # tests never size the cache from free memory, except the one that checks that


def _prompts(n_list, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (n,), generator=gen).tolist() for n in n_list]


def _hf_greedy(model, prompts, max_new):
    outs = []
    model.generation_config.eos_token_id = None
    for ids in prompts:
        x = torch.tensor([ids], device="cuda")
        with torch.no_grad():
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                               min_new_tokens=max_new, do_sample=False, pad_token_id=0)
        outs.append(y[0, len(ids) :].tolist())
    return outs


def _llm(path, **kwargs) -> LLM:
    kwargs.setdefault("kv_cache_gib", KV_GIB)
    return LLM(str(path), device="cuda", progress=False, block_size=16, **kwargs)


def _generate(llm, prompts, max_new, **kwargs):
    params = SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True, **kwargs)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _free(*objs):
    for o in objs:
        if isinstance(o, LLM):
            o.shutdown()
    del objs
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_greedy_float32_matches_transformers(tmp_path, arch, enforce_eager):
    from transformers import AutoModelForCausalLM

    path = save_tiny_model(tmp_path / arch, arch)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    prompts = _prompts((5, 17, 33, 64, 1, 130))
    llm = _llm(path, dtype="float32", enforce_eager=enforce_eager)
    assert (llm.engine.runner.graphs is None) == enforce_eager
    ours = _generate(llm, prompts, 24)
    assert ours == _hf_greedy(hf, prompts, 24)
    # chunked prefill over several steps, mixing prefill chunks with decode rows
    chunked = _llm(path, dtype="float32", enforce_eager=enforce_eager, max_num_batched_tokens=19)
    assert _generate(chunked, prompts, 24) == ours
    _free(llm, chunked, hf)


def test_cuda_graph_tokens_equal_eager(tmp_path):
    path = save_tiny_model(tmp_path / "llama", "llama")
    prompts = _prompts((3, 40, 7, 90, 12))  # 5 rows: graphs pad the batch to 8
    graphs = _llm(path, dtype="float32")
    eager = _llm(path, dtype="float32", enforce_eager=True)
    assert graphs.engine.runner.graphs is not None and 8 in graphs.engine.runner.graphs.sizes
    assert _generate(graphs, prompts, 40) == _generate(eager, prompts, 40)
    # bf16 too: same kernels, same batch shapes except the padding rows
    graphs16 = _llm(path, dtype="bfloat16")
    eager16 = _llm(path, dtype="bfloat16", enforce_eager=True)
    assert _generate(graphs16, prompts[:1], 40) == _generate(eager16, prompts[:1], 40)
    _free(graphs, eager, graphs16, eager16)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_bf16_logprobs_within_bf16_tolerance(tmp_path, arch):
    """Our bf16 log-probs of the first steps are as close to the fp32 reference as transformers'
    own bf16 run is (teacher-forced on our tokens, so both see the same sequence)."""
    from transformers import AutoModelForCausalLM

    path = save_tiny_model(tmp_path / arch, arch)
    prompt = _prompts((37,))[0]
    llm = _llm(path, dtype="bfloat16")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=5)
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    seq = torch.tensor([prompt + out.token_ids[:-1]], device="cuda")
    ref = {}
    for dtype in (torch.float32, torch.bfloat16):
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).cuda().eval()
        with torch.no_grad():
            logits = hf(seq).logits[0, len(prompt) - 1 :].float()  # (steps, vocab)
        ref[dtype] = torch.log_softmax(logits, -1)
        del hf
    ours_err, hf_err = 0.0, 0.0
    for step, lp in enumerate(out.logprobs):
        ids = torch.tensor(lp.top_token_ids, device="cuda")
        ours = torch.tensor(lp.top_logprobs, device="cuda")
        ours_err = max(ours_err, (ours - ref[torch.float32][step, ids]).abs().max().item())
        hf_err = max(hf_err, (ref[torch.bfloat16][step, ids] - ref[torch.float32][step, ids])
                     .abs().max().item())
    assert ours_err <= 2 * hf_err + 0.05, (ours_err, hf_err)
    _free(llm)


def test_kv_cache_sized_from_gpu_memory_utilization(tmp_path):
    path = save_tiny_model(tmp_path / "qwen3", "qwen3")
    free, total = torch.cuda.mem_get_info()
    util = min(0.95, (total - free) / total + 0.05)  # ~5% of the card on top of what is in use
    llm = LLM(str(path), device="cuda", progress=False, gpu_memory_utilization=util,
              max_model_len=512)
    runner = llm.engine.runner
    kv_bytes = runner.num_blocks * runner.block_size * runner.config.kv_bytes_per_token(2)
    assert 0.5 * 0.05 * total < kv_bytes < 0.06 * total
    assert len(_generate(llm, _prompts((9, 300)), 8)) == 2
    _free(llm)


def test_dummy_weights_without_tokenizer():
    config_dir = str(Path(__file__).resolve().parent.parent / "bench/configs/qwen3-0.6b")
    llm = LLM(config_dir, load_format="dummy", device="cuda", progress=False,
              max_model_len=256, kv_cache_gib=0.5, max_num_seqs=8)
    out = _generate(llm, _prompts((20, 3, 100)), 12, detokenize=False)
    assert [len(t) for t in out] == [12, 12, 12]
    with pytest.raises(ValueError, match="token ids"):
        llm.generate("hello", use_tqdm=False)
    _free(llm)


def test_async_scheduling_tokens_equal_sync(tmp_path):
    """The overlapped step (next step scheduled while the GPU runs, sampled ids fed back on the
    device) gives the same greedy and seeded tokens as the synchronous one, sequences finishing
    at different steps and on stop tokens included, and frees every block."""
    path = save_tiny_model(tmp_path / "qwen3", "qwen3")
    prompts = _prompts((3, 40, 7, 90, 12, 1, 33))
    lengths = [30, 5, 17, 1, 30, 12, 2]
    results = {}
    for overlap in (False, True):
        llm = _llm(path, dtype="float32", async_scheduling=overlap, max_num_batched_tokens=64)
        assert llm.engine._async is overlap
        greedy = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
        seeded = [SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=i, max_tokens=n,
                                 ignore_eos=True) for i, n in enumerate(lengths)]
        runs = [llm.generate(prompts, p, use_tqdm=False) for p in (greedy, seeded)]
        stop = runs[0][0].outputs[0].token_ids[6]  # sequence 0 stops early on its 7th token
        stopped = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True,
                                  stop_token_ids=[stop]) for n in lengths]
        runs.append(llm.generate(prompts, stopped, use_tqdm=False))
        results[overlap] = [[(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in run]
                            for run in runs]
        assert llm.engine.scheduler.block_manager.snapshot().num_used == 0
        _free(llm)
    assert results[True] == results[False]
    assert [len(t) for t, _ in results[True][0]] == lengths
    assert results[True][2][0][1] == "stop"


def test_plain_seeded_rows_reproducible_on_cuda(tmp_path):
    """A seeded temperature-only row takes the fused sampling kernel: the same tokens alone and
    beside other rows, with synchronous and overlapped steps."""
    path = save_tiny_model(tmp_path / "qwen3", "qwen3")
    prompts = _prompts((5, 40, 9))
    seeded = SamplingParams(temperature=0.8, seed=7, max_tokens=20, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    runs = []
    for overlap in (False, True):
        llm = _llm(path, dtype="float32", async_scheduling=overlap)
        alone = llm.generate(prompts[1:2], seeded, use_tqdm=False)[0].outputs[0].token_ids
        batch = llm.generate(prompts, [other, seeded, other], use_tqdm=False)
        runs += [alone, batch[1].outputs[0].token_ids]
        _free(llm)
    assert all(r == runs[0] for r in runs) and len(set(runs[0])) > 1


def test_fused_kv_write_tokens_equal_unfused(tmp_path, monkeypatch):
    """Decode attention with the K/V write fused in gives the greedy tokens of write_kv + decode."""
    from hearth.engine.triton_attention import TritonAttention

    path = save_tiny_model(tmp_path / "llama", "llama")
    prompts = _prompts((3, 40, 7, 90, 12))
    fused = _llm(path, dtype="float32")
    tokens = _generate(fused, prompts, 30)
    _free(fused)
    monkeypatch.setattr(TritonAttention, "fuse_kv_write", False)
    unfused = _llm(path, dtype="float32")
    assert not unfused.engine.runner.backend.fuse_kv_write
    assert _generate(unfused, prompts, 30) == tokens
    _free(unfused)



def test_pdl_launches_give_the_tokens_of_plain_launches(tmp_path, monkeypatch):
    """Kernels launched with programmatic dependent launch (kernels/pdl.py; Hopper+) in the decode
    CUDA graphs give the greedy tokens of plain launches, in bf16 (norm, rotary, attention,
    SiLU kernels between cuBLAS linears)."""
    from hearth.kernels import pdl

    if not pdl.active(torch.device("cuda")):
        pytest.skip("PDL needs compute capability 9.0+")
    path = save_tiny_model(tmp_path / "llama", "llama")
    prompts = _prompts((3, 40, 7, 90, 12))
    runs = {}
    for on in (True, False):
        monkeypatch.setattr(pdl, "ENABLED", on)
        llm = _llm(path, dtype="bfloat16")
        runs[on] = _generate(llm, prompts, 30)
        _free(llm)
    assert runs[True] == runs[False]


def _hf_model(path, dtype, fp8_kv: bool):
    """transformers' model; fp8_kv: its keys and values rounded to e4m3 (scale 1, saturated)
    before attention, which is what an fp8 KV cache does to them."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def fp8_kv_sdpa(module, query, key, value, *args, **kwargs):
        key, value = (t.float().clamp(-448, 448).to(torch.float8_e4m3fn).to(t.dtype)
                      for t in (key, value))
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    AttentionInterface.register("hearth_fp8_kv", fp8_kv_sdpa)
    attn = "hearth_fp8_kv" if fp8_kv else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    return model.cuda().eval()


def _first_step_logprobs(model, prompts) -> list[torch.Tensor]:
    """(vocab,) log-probs of the first generated token of each prompt."""
    out = []
    for ids in prompts:
        with torch.no_grad():
            logits = model(torch.tensor([ids], device="cuda")).logits[0, -1].float()
        out.append(torch.log_softmax(logits, -1))
    return out


def _worst_gap(outputs, ref, other=None) -> float:
    """Largest |log-prob difference| over each output's first-step top-5 tokens, against
    full-vocabulary log-probs `ref`, or against another run's top 5 (`other`: shared ids)."""
    worst = 0.0
    for i, out in enumerate(outputs):
        first = out.logprobs[0]
        for token, lp in zip(first.top_token_ids, first.top_logprobs, strict=True):
            if other is None:
                worst = max(worst, abs(lp - ref[i][token].item()))
            else:
                theirs = dict(zip(other[i].logprobs[0].top_token_ids,
                                  other[i].logprobs[0].top_logprobs))
                worst = max(worst, abs(lp - theirs[token]) if token in theirs else 0.0)
    return worst


def test_fp8_kv_cache_doubles_blocks_and_stays_close_to_bf16(tmp_path):
    """An e4m3 KV cache: twice the blocks of bf16 in the same budget; prefill, decode CUDA graphs,
    the fused K/V write and a copy-on-write of a forked block all read and write it. Closeness is
    judged against what rounding K/V to e4m3 does to transformers' own model (the measured
    yardstick; this random tiny model is sensitive: ~0.4 nats on its first-step log-probs):
      - float32 model + fp8 KV == transformers float32 with K/V rounded to e4m3 (first-step
        log-probs within 0.1: only elements on an e4m3 rounding boundary may round differently);
      - bf16 model: fp8 KV moves our log-probs from the bf16-KV ones no more than twice as far
        as e4m3 rounding moves transformers' bf16 ones (+0.05 for bf16 noise)."""
    path = save_tiny_model(tmp_path / "llama", "llama")
    prompts = _prompts((5, 17, 33, 64, 1, 130))
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=5)
    runs, blocks = {}, {}
    for dtype, kv in (("bfloat16", "auto"), ("bfloat16", "fp8"), ("float32", "fp8")):
        llm = _llm(path, dtype=dtype, kv_cache_dtype=kv)
        runner = llm.engine.runner
        blocks[dtype, kv] = runner.num_blocks
        expected = torch.float8_e4m3fn if kv == "fp8" else torch.bfloat16
        assert runner.kv_caches[0].key.dtype == expected
        runs[dtype, kv] = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        if (dtype, kv) == ("bfloat16", "fp8"):  # 2 greedy samples of a 33-token prompt: its
            pair = llm.generate(prompts[2], SamplingParams(  # last block is copied on write
                temperature=0, max_tokens=12, n=2, ignore_eos=True), use_tqdm=False)
            assert pair[0].outputs[0].token_ids == pair[0].outputs[1].token_ids
        _free(llm)
    assert blocks["bfloat16", "fp8"] == 2 * blocks["bfloat16", "auto"], blocks
    eager = _llm(path, dtype="bfloat16", kv_cache_dtype="fp8", enforce_eager=True)
    graphs_tokens = runs["bfloat16", "fp8"][0].token_ids
    assert _generate(eager, prompts[:1], 16) == [graphs_tokens]  # batch 1: same split count
    _free(eager)
    hf = {}
    for dtype, fp8 in ((torch.float32, True), (torch.bfloat16, False), (torch.bfloat16, True)):
        model = _hf_model(path, dtype, fp8)
        hf[dtype, fp8] = _first_step_logprobs(model, prompts)
        _free(model)
    emulated = _worst_gap(runs["float32", "fp8"], hf[torch.float32, True])
    ours = _worst_gap(runs["bfloat16", "auto"], None, runs["bfloat16", "fp8"])
    theirs = max((hf[torch.bfloat16, True][i] - hf[torch.bfloat16, False][i])[
        list(out.logprobs[0].top_token_ids)].abs().max().item()
        for i, out in enumerate(runs["bfloat16", "auto"]))
    print(f"fp8 KV: blocks {blocks}; fp32 vs emulation {emulated:.4f}; bf16 KV -> fp8 KV moves "
          f"our log-probs {ours:.4f}, transformers' {theirs:.4f}")
    assert emulated <= 0.1
    assert ours <= 2 * theirs + 0.05


DEFAULT_PROMPTS = ["The capital of France is", "def fibonacci(n):"]


def _default_model_tokens(dtype: str, keep: bool, check) -> list[list[int]]:
    """Greedy tokens (8) of DEFAULT_PROMPTS from the default model on CUDA; `check` is called
    with its GGUFLinear layers first."""
    from hearth.engine.layers.linear import GGUFLinear

    llm = LLM(device="cuda", dtype=dtype, progress=False, gguf_keep_quantized=keep,
              kv_cache_gib=KV_GIB, max_model_len=512)
    try:
        check([m for m in llm.engine.runner.model.modules() if isinstance(m, GGUFLinear)])
        ids = [llm.tokenizer.encode(p) for p in DEFAULT_PROMPTS]
        params = SamplingParams(temperature=0, max_tokens=8)
        return [o.outputs[0].token_ids for o in llm.generate(ids, params, use_tqdm=False)]
    finally:
        llm.shutdown()
        _free(llm)


def test_default_model_kept_quantized_on_cuda_same_tokens():
    """The default model's Q4_1 linears kept quantized on CUDA (repacked into the int layout,
    offset mode: GEMV for decode, the fp32 GEMM for prefill, CUDA graphs) give the tokens of the
    float32 weights dequantized at load."""

    def check(keep):
        def layers_ok(layers):
            assert len(layers) == (30 * 4 if keep else 0)
            assert all(m.int_layout is not None and m.offset for m in layers)
        return layers_ok

    outs = {keep: _default_model_tokens("float32", keep, check(keep)) for keep in (False, True)}
    assert outs[True] == outs[False]


def test_default_model_bf16_fragment_words_same_tokens_as_int_layout(monkeypatch):
    """In bf16 the default model's Q4_1 linears become fragment words (kernels/quant/int4_tc.py:
    tensor-core decode, dequantized copy for prefill); greedy tokens equal those of the int
    layout's kernels on the same weights."""
    import hearth.kernels.quant.int4_tc as int4_tc

    def check(frag):
        def layers_ok(layers):
            assert len(layers) == 30 * 4
            assert all((m.frag is not None) == frag for m in layers)
        return layers_ok

    outs = {}
    for frag in (False, True):
        monkeypatch.setattr(int4_tc, "ENABLED", frag)
        outs[frag] = _default_model_tokens("bfloat16", True, check(frag))
    assert outs[True] == outs[False]
