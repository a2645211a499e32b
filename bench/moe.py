"""Qwen3-30B-A3B (128 experts, top 8) on one GPU with random bf16 weights: the fused MoE kernel
alone, batch-1 decode, and nano-vllm's W1 workload, each beside its floor.

    python bench/moe.py [kernel] [b1] [w1] [--json out.json]

    kernel  fused_moe (kernels/moe.py) at 1, 8, 64, 256 and 2048 tokens: time, and the bytes of
            the experts the routing touches / copy bandwidth (the floor of a memory-bound step)
    b1      batch 1, 128 in / 256 out: ms per output token; floor = the weights one token reads
            (attention, router, its 8 experts, LM head: ModelConfig.num_active_params) + its K/V,
            over the copy bandwidth
    w1      256 sequences, prompt/output lengths U[100, 1024] (bench/throughput.py's W1 draw):
            output tok/s; floor = per decode step the dense weights plus the experts a batch of
            that size touches (E * (1 - (1 - k/E)^b) per layer, routing uniform as random
            weights route) + K/V once per token + prompt FLOPs over the matmul rate

Ceilings (copy bandwidth, bf16 matmul rate) are measured in the same run (bench/throughput.py).
Results go to docs/benchmarks.md with the card.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
from pathlib import Path

import torch
from throughput import measure_ceilings

from hearth import LLM, SamplingParams
from hearth.engine.loader import load_hf_config

CONFIG = Path(__file__).resolve().parent / "configs" / "qwen3-30b-a3b"


def bench_kernel(bandwidth: float) -> list[dict]:
    from triton.testing import do_bench

    from hearth.engine.models.moe import route
    from hearth.kernels.moe import fused_moe

    cfg = load_hf_config(CONFIG)
    moe, h = cfg.moe, cfg.hidden_size
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(moe.num_experts, 2 * moe.intermediate_size, h, device="cuda",
                      dtype=torch.bfloat16, generator=gen) * 0.02
    w2 = torch.randn(moe.num_experts, h, moe.intermediate_size, device="cuda",
                     dtype=torch.bfloat16, generator=gen) * 0.02
    gate = torch.randn(moe.num_experts, h, device="cuda", dtype=torch.bfloat16, generator=gen)
    expert_bytes = 3 * h * moe.intermediate_size * 2
    rows = []
    for tokens in (1, 8, 64, 256, 2048):
        x = torch.randn(tokens, h, device="cuda", dtype=torch.bfloat16, generator=gen)
        weights, ids = route(x @ gate.T, moe.num_experts_per_tok, True, x.dtype)
        ms = do_bench(lambda x=x, w=weights, i=ids: fused_moe(x, w13, w2, w, i),
                      return_mode="median")
        touched = ids.unique().numel()
        floor_ms = 1e3 * touched * expert_bytes / bandwidth
        rows.append({"tokens": tokens, "experts": touched, "ms": ms, "floor_ms": floor_ms,
                     "pct_floor": 100 * floor_ms / ms})
        print(f"  fused_moe {tokens:5d} tokens, {touched:3d} experts: {ms * 1e3:8.1f} us, "
              f"floor {floor_ms * 1e3:7.1f} us ({100 * floor_ms / ms:.0f}% of floor)", flush=True)
    return rows


def _llm(max_num_seqs: int) -> LLM:
    gc.collect()  # the previous part's engine, dropped by its caller: 57 GiB of weights
    torch.cuda.empty_cache()
    return LLM(str(CONFIG), load_format="dummy", dtype="bfloat16", progress=False,
               max_model_len=2048, max_num_seqs=max_num_seqs, max_num_batched_tokens=4096,
               enable_prefix_caching=False)


def _run(llm: LLM, prompts: list[list[int]], outs: list[int], temperature: float) -> float:
    warm = SamplingParams(temperature=temperature, max_tokens=8, ignore_eos=True,
                          detokenize=False)
    for n in (1, 3, 16):
        llm.generate([p[:40] for p in prompts[:1] * n], warm, use_tqdm=False)
    params = [SamplingParams(temperature=temperature, max_tokens=o, ignore_eos=True,
                             detokenize=False) for o in outs]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    assert sum(len(r.outputs[0].token_ids) for r in results) == sum(outs)
    if len(results) == 1:
        m = results[0].metrics
        return 1e3 * (m.finished_time - m.first_token_time) / (outs[0] - 1)
    return elapsed


def bench_b1(bandwidth: float) -> dict:
    cfg = load_hf_config(CONFIG)
    rng = random.Random(0)
    prompt, out = [rng.randint(0, 10000) for _ in range(128)], 256
    llm = _llm(1)
    ms = _run(llm, [prompt], [out], 0.0)
    _free(llm)
    del llm
    kv = cfg.kv_bytes_per_token(2) * (128 + out / 2)  # mean context per step
    floor_ms = 1e3 * (cfg.num_active_params * 2 + kv) / bandwidth
    print(f"  b1: {ms:.2f} ms/token, floor {floor_ms:.2f} ms ({100 * floor_ms / ms:.0f}% of "
          f"floor; {cfg.num_active_params / 1e9:.2f} B active parameters)", flush=True)
    return {"ms_per_token": ms, "floor_ms": floor_ms, "pct_floor": 100 * floor_ms / ms}


def w1_floor(prompts, outs, bandwidth: float, flops: float) -> float:
    cfg = load_hf_config(CONFIG)
    moe, h = cfg.moe, cfg.hidden_size
    expert_bytes = 3 * h * moe.intermediate_size * 2
    dense_bytes = (cfg.num_active_params - cfg.num_layers * moe.num_experts_per_tok
                   * 3 * h * moe.intermediate_size) * 2
    t_weights = 0.0
    for step in range(max(outs)):  # continuous batching: b sequences still decoding
        b = sum(1 for o in outs if o > step)
        touched = moe.num_experts * (1 - (1 - moe.num_experts_per_tok / moe.num_experts) ** b)
        t_weights += (dense_bytes + cfg.num_layers * touched * expert_bytes) / bandwidth
    kv_rows = sum(o * len(p) + o * (o - 1) // 2 for p, o in zip(prompts, outs))
    t_kv = kv_rows * cfg.kv_bytes_per_token(2) / bandwidth
    t_prompt = 2 * cfg.num_active_params * sum(len(p) for p in prompts) / flops
    return t_weights + t_kv + t_prompt


def bench_w1(bandwidth: float, flops: float) -> dict:
    rng = random.Random(0)  # bench/throughput.py's W1 draw
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))]
               for _ in range(256)]
    outs = [rng.randint(100, 1024) for _ in range(256)]
    llm = _llm(256)
    seconds = _run(llm, prompts, outs, 0.6)
    _free(llm)
    del llm
    floor = w1_floor(prompts, outs, bandwidth, flops)
    tok_s = sum(outs) / seconds
    print(f"  w1: {tok_s:.0f} output tok/s ({seconds:.1f} s), floor {floor:.1f} s "
          f"({100 * floor / seconds:.0f}% of floor)", flush=True)
    return {"tok_s": tok_s, "seconds": seconds, "floor_s": floor,
            "pct_floor": 100 * floor / seconds}


def _free(llm: LLM) -> None:
    llm.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", choices=["kernel", "b1", "w1"],
                        default=["kernel", "b1", "w1"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    bandwidth, flops = measure_ceilings()
    card = torch.cuda.get_device_name()
    print(f"{card}: copy {bandwidth / 1e12:.2f} TB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s",
          flush=True)
    results = {"card": card, "bandwidth": bandwidth, "flops": flops, "date": time.strftime("%F"),
               "torch": torch.__version__}
    if "kernel" in args.parts:
        results["kernel"] = bench_kernel(bandwidth)
    if "b1" in args.parts:
        results["b1"] = bench_b1(bandwidth)
    if "w1" in args.parts:
        results["w1"] = bench_w1(bandwidth, flops)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
