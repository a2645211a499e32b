"""End-to-end GPU throughput: Hearth vs transformers on the same inputs and card, with the roofline.

Workloads (random bf16 weights, ignore EOS; configs in bench/configs/):
    W1  Qwen3-0.6B, nano-vllm's bench.py: 256 seqs, prompt/output lengths U[100, 1024],
        token ids U[0, 10000]
    W2  Llama-3-8B, the same 256 sequences
    W3  Llama-3-8B, 200 x (1024 in / 128 out)
    W4  Llama-3-8B, batch 1, 128 in / 256 out  (ms per output token)

The floor of a run: decode steps x weight bytes / bandwidth + every K/V row read once per decode
step / bandwidth + prompt FLOPs / matmul rate, with both ceilings measured in the same run.
The transformers side runs static `generate` batches on a capped subset (device time is scarce):
the first `--hf-seqs` sequences, outputs capped at `--hf-max-new` tokens; the table says so.

    python bench/throughput.py W1 W4 [--skip-hf] [--async-scheduling on|off|both] [--json out.json]

`--async-scheduling both` runs Hearth twice, synchronous steps first (the baseline, same card).
`--fusions both` runs Hearth twice too, first without the fused sampling kernel and without the
K/V write and rotary fused into decode attention (the baseline), then with them (the default).
`--pdl both` runs Hearth twice, first with every kernel launched plainly (the baseline), then
with programmatic dependent launch (kernels/pdl.py; Hopper, the default).
`--kv-cache-dtype fp8` runs Hearth with an e4m3 KV cache (twice the blocks; the floor then counts
one byte per cached value).
`--weights awq-int4` runs Hearth with AWQ int4 (group 128) dummy weights in every decoder linear
(the LM head stays bf16, as AWQ checkpoints keep it); the floor then counts 4 bits per linear
weight plus its group's fp16 scale and 8-bit zero.
"""

import argparse
import gc
import json
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent

import torch  # noqa: E402

from hearth import LLM, SamplingParams  # noqa: E402
from hearth.engine.loader import load_hf_config  # noqa: E402
from hearth.engine.triton_attention import TritonAttention  # noqa: E402

CONFIGS = {
    "qwen3": _ROOT / "bench/configs/qwen3-0.6b",
    "llama8b": _ROOT / "bench/configs/llama-3-8b",
}


@dataclass
class Workload:
    name: str
    model: str
    prompts: list[list[int]]
    max_tokens: list[int]
    temperature: float = 0.0  # W1/W2 sample at 0.6 as nano-vllm's bench.py does; W3/W4 greedy


def make_workload(name: str) -> Workload:
    rng = random.Random(0)
    if name in ("W1", "W2"):  # nano-vllm bench.py, same draw order
        prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))]
                   for _ in range(256)]
        outs = [rng.randint(100, 1024) for _ in range(256)]
        return Workload(name, "qwen3" if name == "W1" else "llama8b", prompts, outs, 0.6)
    if name == "W3":
        prompts = [[rng.randint(0, 10000) for _ in range(1024)] for _ in range(200)]
        return Workload(name, "llama8b", prompts, [128] * 200)
    if name == "W4":
        return Workload(name, "llama8b", [[rng.randint(0, 10000) for _ in range(128)]], [256])
    raise ValueError(f"unknown workload {name!r}")


# ------------------------------------------------------------------------------------- ceilings
def measure_ceilings() -> tuple[float, float]:
    """(copy bandwidth bytes/s counting read + write, bf16 matmul FLOP/s) on random data."""
    from triton.testing import do_bench

    src = torch.randn(1 << 28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    bandwidth = 2 * src.numel() * 4 / (ms * 1e-3)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, return_mode="median")
    return bandwidth, 2 * 8192**3 / (ms * 1e-3)


AWQ_INT4 = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
            "version": "gemm"}


def model_dir(w: Workload, weights: str) -> str:
    """The config directory Hearth loads: the workload's, or a copy with AWQ int4 declared."""
    if weights == "bf16":
        return str(CONFIGS[w.model])
    config = json.loads((CONFIGS[w.model] / "config.json").read_text())
    config["quantization_config"] = AWQ_INT4
    out = Path(tempfile.mkdtemp(prefix=f"hearth-{w.model}-awq-"))
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


def floor_seconds(w: Workload, bandwidth: float, flops: float, kv_bytes: int = 2,
                  weights: str = "bf16") -> dict:
    cfg = load_hf_config(CONFIGS[w.model])
    embed = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size  # rows gathered only
    weight_bytes = (cfg.num_params - embed) * 2
    if weights == "awq-int4":  # 4-bit linears + per-128 fp16 scale and 8-bit zero
        linear = cfg.num_linear_params
        weight_bytes -= linear * 2 - linear * (0.5 + 3 / 128)
    steps = max(w.max_tokens)  # continuous batching: the longest output sets the step count
    pairs = zip(w.prompts, w.max_tokens, strict=True)
    kv_rows = sum(o * len(p) + o * (o - 1) // 2 for p, o in pairs)  # context read per new token
    prompt_tokens = sum(len(p) for p in w.prompts)
    t_weights = steps * weight_bytes / bandwidth
    t_kv = kv_rows * cfg.kv_bytes_per_token(kv_bytes) / bandwidth
    t_prompt = 2 * (cfg.num_params - embed) * prompt_tokens / flops
    return {"weights_s": t_weights, "kv_s": t_kv, "prompt_s": t_prompt,
            "total_s": t_weights + t_kv + t_prompt}


# --------------------------------------------------------------------------------------- Hearth
class StepProfile:
    """Wall time per engine step and GPU time of the decode graph replays (CUDA events)."""

    def __init__(self, llm: LLM) -> None:
        self.engine, self.runner = llm.engine, llm.engine.runner
        self.steps: list[tuple[float, float]] = []  # (step wall s, execute wall s)
        self.events: list[tuple] = []
        self._wrap()

    def _wrap(self) -> None:
        step, execute, launch = self.engine.step, self.runner.execute, self.runner.launch
        holder = {}

        def timed_execute(schedule, *grammars):
            t = time.perf_counter()
            out = execute(schedule, *grammars)
            holder["exec"] = time.perf_counter() - t
            return out

        def timed_launch(schedule, prev):
            t = time.perf_counter()
            out = launch(schedule, prev)
            holder["exec"] = time.perf_counter() - t
            return out

        def timed_step(**kwargs):
            holder["exec"], holder["graph"] = 0.0, False
            t = time.perf_counter()
            out = step(**kwargs)
            self.steps.append((time.perf_counter() - t, holder["exec"], holder["graph"]))
            return out

        self.engine.step, self.runner.execute = timed_step, timed_execute
        self.runner.launch = timed_launch
        graphs = self.runner.graphs
        if graphs is not None:
            replay = graphs.replay

            def timed_replay(num_seqs):
                holder["graph"] = True
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
                start.record()
                out = replay(num_seqs)
                end.record()
                self.events.append((start, end, num_seqs))
                return out

            graphs.replay = timed_replay

    def summary(self) -> dict:
        torch.cuda.synchronize()
        gpu_ms = [s.elapsed_time(e) for s, e, _ in self.events]
        graph = [(s, e) for s, e, g in self.steps if g]
        eager = [s for s, _, g in self.steps if not g]
        n = max(len(graph), 1)
        return {
            "steps": len(self.steps),
            "eager_steps": len(eager),
            "eager_total_s": sum(eager),
            "graph_steps": len(graph),
            "graph_step_ms": 1e3 * sum(s for s, _ in graph) / n,
            "graph_execute_ms": 1e3 * sum(e for _, e in graph) / n,
            "graph_gpu_ms": sum(gpu_ms) / max(len(gpu_ms), 1),  # forward + LM head (replay)
            "graph_batch": sum(b for *_, b in self.events) / max(len(gpu_ms), 1),
        }


def run_hearth(w: Workload, args, async_scheduling: bool = True, fused: bool = True,
               pdl_on: bool = True, model_path: str | None = None,
               structured_output: bool = True) -> dict:
    """`model_path`: another directory with the workload's config (bench/structured.py adds a
    tokenizer, so that the engine has its grammar machinery); `structured_output`: off, the
    engine has none (the baseline of the grammar hook's cost)."""
    from hearth.kernels import pdl

    pdl.ENABLED = pdl_on  # read at every launch, so for the whole run (graphs capture it)
    batched = max(16384, max(len(p) for p in w.prompts))
    TritonAttention.fuse_kv_write = fused  # read when the engine makes its backend
    llm = LLM(model_path or model_dir(w, args.weights), load_format="dummy", dtype="bfloat16",
              progress=False, max_model_len=2048, max_num_seqs=min(256, len(w.prompts)),
              max_num_batched_tokens=batched, gpu_memory_utilization=args.gpu_util,
              enable_prefix_caching=False, async_scheduling=async_scheduling,
              kv_cache_dtype=args.kv_cache_dtype, structured_output=structured_output)
    TritonAttention.fuse_kv_write = True
    llm.engine.runner.sampler.use_kernel = None if fused else False
    # Warm-up: 1, 3 and (if allowed) 16 short prompts, so no kernel compiles in the timed run.
    warm = SamplingParams(temperature=w.temperature, max_tokens=8, ignore_eos=True,
                          detokenize=False)
    for n in (1, 3, 16):
        llm.generate([p[: 37 + 29 * i] for i, p in enumerate(w.prompts[:1] * n)], warm,
                     use_tqdm=False)
    params = [SamplingParams(temperature=w.temperature, max_tokens=o, ignore_eos=True,
                             detokenize=False) for o in w.max_tokens]
    profile = StepProfile(llm)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate(w.prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    num_out = sum(len(o.outputs[0].token_ids) for o in outs)
    assert num_out == sum(w.max_tokens), (num_out, sum(w.max_tokens))
    result = {"seconds": elapsed, "output_tokens": num_out, "tok_s": num_out / elapsed,
              "num_kv_blocks": llm.engine.runner.num_blocks, **profile.summary()}
    if args.profile:
        result["kernels"] = profile_graph(llm.engine.runner, w)
        if len(w.prompts) > 16:  # the run's tail: few sequences left, the fixed cost shows
            result["kernels_batch16"] = profile_graph(llm.engine.runner, w, rows_hint=16)
    if len(outs) == 1:
        m = outs[0].metrics
        result["ms_per_token"] = 1e3 * (m.finished_time - m.first_token_time) / (num_out - 1)
    llm.shutdown()
    pdl.ENABLED = True
    del llm, profile, outs
    gc.collect()
    torch.cuda.empty_cache()
    return result


def profile_graph(runner, w: Workload, rows_hint: int = 128) -> list[tuple[str, float]]:
    """Kernel time per replay of the decode graph at this workload's typical batch and context
    (random block tables, nothing written): where a decode step's GPU time goes."""
    from torch.profiler import ProfilerActivity, profile

    graphs = runner.graphs
    batch = graphs.padded_size(min(len(w.prompts), rows_hint))
    ctx = min(2047, sum(len(p) for p in w.prompts) // len(w.prompts) + max(w.max_tokens) // 2)
    width = graphs.block_tables.shape[1]
    blocks = torch.randperm(runner.num_blocks, device="cuda")[: batch * width].int()
    graphs.block_tables[:batch].copy_(blocks.view(batch, width))
    graphs.seq_lens[:batch].fill_(ctx)
    graphs.slot_mapping[:batch].fill_(-1)
    graphs.positions[:batch].fill_(ctx - 1)
    reps = 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            graphs.graphs[batch].replay()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    rows = sorted(averages, key=lambda e: -e.device_time_total)[:10]
    table = [(e.key[:60], e.device_time_total / reps / 1e3) for e in rows]  # ms per replay
    launches = sum(e.count for e in averages) / reps
    total_ms = sum(e.device_time_total for e in averages) / reps / 1e3
    print(f"  graph batch {batch}, context {ctx}: {launches:.0f} kernels, {total_ms:.3f} ms of "
          f"kernel time per replay; by kernel:", flush=True)
    for name, ms in table:
        print(f"    {ms:7.3f}  {name}", flush=True)
    return table


# --------------------------------------------------------------------------------- transformers
def run_transformers(w: Workload, args) -> dict:
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(CONFIGS[w.model])
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    n = min(args.hf_seqs, len(w.prompts))
    cap = args.hf_max_new if len(w.prompts) > 1 else args.hf_max_new_single
    prompts, outs = w.prompts[:n], [min(o, cap) for o in w.max_tokens[:n]]
    total, t_all = 0, 0.0
    for i in range(0, n, args.hf_batch):
        batch, lens = prompts[i : i + args.hf_batch], outs[i : i + args.hf_batch]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device="cuda")
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=max(lens),
                           min_new_tokens=max(lens), do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        t_all += time.perf_counter() - t0
        total += sum(lens)  # tokens each sequence asked for; padding steps are not counted
    del model
    gc.collect()
    torch.cuda.empty_cache()
    result = {"subset": f"first {n} seqs, outputs capped at {cap}, static batches of "
                        f"{args.hf_batch}", "seconds": t_all, "output_tokens": total,
              "tok_s": total / t_all}
    if len(w.prompts) == 1:
        result["ms_per_token"] = 1e3 * t_all / total
    return result


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _with_programs_per_sm(value: int, w: Workload, args) -> dict:
    """One Hearth run with the decode attention's split target set (its graphs are captured
    inside the run, so they take it)."""
    import hearth.kernels.paged_attention as paged_attention

    before = paged_attention._PROGRAMS_PER_SM
    paged_attention._PROGRAMS_PER_SM = value
    try:
        return run_hearth(w, args, async_scheduling=True)
    finally:
        paged_attention._PROGRAMS_PER_SM = before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workloads", nargs="+", choices=["W1", "W2", "W3", "W4"])
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--hf-seqs", type=int, default=64)
    parser.add_argument("--hf-batch", type=int, default=64)
    parser.add_argument("--hf-max-new", type=int, default=128)
    parser.add_argument("--hf-max-new-single", type=int, default=64)
    parser.add_argument("--gpu-util", type=float, default=0.9)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--async-scheduling", choices=["on", "off", "both"], default="on")
    parser.add_argument("--fusions", choices=["on", "off", "both"], default="on",
                        help="fused sampling kernel + K/V write in decode attention")
    parser.add_argument("--pdl", choices=["on", "off", "both"], default="on",
                        help="programmatic dependent launch on Hopper (kernels/pdl.py)")
    parser.add_argument("--profile", action="store_true", help="kernel times of a decode replay")
    parser.add_argument("--kv-cache-dtype", choices=["auto", "fp8", "fp8_e4m3"], default="auto",
                        help="Hearth's KV cache: auto (bf16) or fp8 (e4m3)")
    parser.add_argument("--weights", choices=["bf16", "awq-int4"], default="bf16",
                        help="Hearth's decoder linears: bf16 or AWQ int4 g128 (dummy)")
    parser.add_argument("--decode-programs-per-sm", type=_int_list, default=[],
                        help="decode attention's split target (kernels/paged_attention.py "
                             "_PROGRAMS_PER_SM, default 8), a comma list such as 2,6,2: "
                             "one Hearth run of each workload a value, in this order, in "
                             "place of the default run")
    args = parser.parse_args()
    bandwidth, flops = measure_ceilings()
    card = torch.cuda.get_device_name()
    print(f"{card}: copy {bandwidth / 1e12:.2f} TB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s",
          flush=True)
    results = {"card": card, "bandwidth": bandwidth, "flops": flops, "date": time.strftime("%F"),
               "torch": torch.__version__, "kv_cache_dtype": args.kv_cache_dtype,
               "weights": args.weights,
               "workloads": {}}
    for name in args.workloads:
        w = make_workload(name)
        floor = floor_seconds(w, bandwidth, flops, 2 if args.kv_cache_dtype == "auto" else 1,
                              args.weights)
        entry = {"floor": floor}
        if args.async_scheduling in ("off", "both"):
            entry["hearth_sync"] = run_hearth(w, args, async_scheduling=False)
            print(name, "hearth sync", json.dumps(entry["hearth_sync"]), flush=True)
        if args.async_scheduling in ("on", "both") and args.fusions in ("off", "both"):
            entry["hearth_unfused"] = run_hearth(w, args, async_scheduling=True, fused=False)
            print(name, "hearth unfused", json.dumps(entry["hearth_unfused"]), flush=True)
        if args.pdl in ("off", "both"):
            entry["hearth_nopdl"] = run_hearth(w, args, async_scheduling=True, pdl_on=False)
            print(name, "hearth without PDL", json.dumps(entry["hearth_nopdl"]), flush=True)
        if (args.async_scheduling in ("on", "both") and args.fusions in ("on", "both")
                and args.pdl in ("on", "both") and not args.decode_programs_per_sm):
            entry["hearth"] = run_hearth(w, args, async_scheduling=True)
            print(name, "hearth", json.dumps(entry["hearth"]), flush=True)
        for i, pps in enumerate(args.decode_programs_per_sm):
            key = f"hearth_pps{pps}" + (f"_{i}" if args.decode_programs_per_sm.count(pps) > 1
                                        else "")
            entry[key] = _with_programs_per_sm(pps, w, args)
            print(name, key, json.dumps(entry[key]), flush=True)
        if not args.skip_hf:
            entry["transformers"] = run_transformers(w, args)
            print(name, "transformers", json.dumps(entry["transformers"]), flush=True)
        results["workloads"][name] = entry
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    print_table(results)


def print_table(results: dict) -> None:
    print(f"\n{results['card']}  {results['date']}  copy {results['bandwidth'] / 1e12:.2f} TB/s  "
          f"bf16 {results['flops'] / 1e12:.0f} TFLOP/s  "
          f"KV cache {results.get('kv_cache_dtype', 'auto')}  "
          f"weights {results.get('weights', 'bf16')}")
    print("wl  hearth            floor            % floor  transformers (subset)  "
          "decode step_ms gpu_ms")
    for name, e in results["workloads"].items():
        suffixes = {"hearth_sync": " sync", "hearth_unfused": " base", "hearth_nopdl": " nopdl",
                    "hearth": ""}
        suffixes.update({k: " " + k[len("hearth_"):] for k in e if k.startswith("hearth_pps")})
        for key, suffix in suffixes.items():
            if key in e:
                _print_row(name + suffix, e, e[key])


def _print_row(name: str, e: dict, h: dict) -> None:
    f = e["floor"]
    total_out = h["output_tokens"]
    floor_rate = total_out / f["total_s"]
    if "ms_per_token" in h:
        floor_ms = 1e3 * (f["weights_s"] + f["kv_s"]) / total_out
        ours, flr = f"{h['ms_per_token']:.2f} ms/tok", f"{floor_ms:.2f} ms/tok"
        pct = floor_ms / h["ms_per_token"]
        hf = e.get("transformers", {}).get("ms_per_token")
        hf_s = f"{hf:.1f} ms/tok" if hf else "-"
    else:
        ours, flr = f"{h['tok_s']:.0f} tok/s", f"{floor_rate:.0f} tok/s"
        pct = h["tok_s"] / floor_rate
        hf = e.get("transformers", {}).get("tok_s")
        hf_s = f"{hf:.0f} tok/s" if hf else "-"
    print(f"{name}  {ours:17s} {flr:16s} {100 * pct:6.0f}%  {hf_s:22s} "
          f"{h['graph_step_ms']:7.2f} {h['graph_gpu_ms']:6.2f}")


if __name__ == "__main__":
    main()
