"""CPU benchmark: the default model, prompt ~512 tokens, 128 new tokens, batch 1 and batch 16.

Reports prefill tok/s (prompt tokens / time until every sequence has its first token) and decode
tok/s (tokens generated after that / time), for Hearth, and in the same run for transformers and,
when `llama_cpp` is importable (pip install llama-cpp-python: a ~9 min source build, kept out
of CI),
llama.cpp on the same GGUF. Not a test: numbers go to docs/benchmarks.md.

    python bench/cpu.py [--dtype float32|bfloat16] [--gguf-keep-quantized] [--batch 1 16]
                        [--skip-transformers] [--model DIR]

`--model DIR` times another model (e.g. a `hearth quantize` checkpoint of the default model)
instead, Hearth only.

`--dtype bfloat16 --gguf-keep-quantized` runs the GGUF's Q4_1 linears from their 4-bit blocks
through torch's int4 GEMV (engine/quantization/cpu_int4.py): the weights llama.cpp reads.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.helpers, as documented

from hearth import LLM, SamplingParams  # noqa: E402

PROMPT_LEN, NEW_TOKENS = 512, 128
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _prompts(batch: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    # Distinct prompts, so the prefix cache cannot skip work; ids from the ordinary vocabulary.
    return [torch.randint(100, 40000, (PROMPT_LEN,), generator=gen).tolist() for _ in range(batch)]


def bench_hearth(llm: LLM, batch: int) -> tuple[float, float]:
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    prompts = _prompts(batch, seed=batch)
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"b{batch}-{i}", p, params)
    first: set[str] = set()
    t_first = None
    done = 0
    while done < batch:
        for out in engine.step():
            first.add(out.request_id)
            done += out.finished
        if t_first is None and len(first) == batch:
            t_first = time.perf_counter()
    end = time.perf_counter()
    prefill = batch * PROMPT_LEN / (t_first - start)
    decode = batch * (NEW_TOKENS - 1) / (end - t_first)
    return prefill, decode


def bench_transformers(batch: int) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    from tests.helpers import default_model_dir

    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), gguf_file=GGUF,
                                                 dtype=torch.float32).eval()
    x = torch.tensor(_prompts(batch, seed=batch))
    mask = torch.ones_like(x)
    with torch.no_grad():
        start = time.perf_counter()
        model.generate(x, attention_mask=mask, max_new_tokens=1, do_sample=False)
        t_prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(x, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                       min_new_tokens=NEW_TOKENS)
        total = time.perf_counter() - start
    return batch * PROMPT_LEN / t_prefill, batch * (NEW_TOKENS - 1) / (total - t_prefill)


_LLAMA_CPP = """
import json, os, sys, time
from llama_cpp import Llama
llm = Llama(sys.argv[1], n_ctx=1024, n_threads=os.cpu_count(), verbose=False)
prompt = json.loads(sys.argv[2])
start = time.perf_counter()
llm.eval(prompt)
t_prefill = time.perf_counter() - start
start = time.perf_counter()
for _ in range(int(sys.argv[3]) - 1):
    llm.eval([llm.sample(temp=0.0)])
print(json.dumps([len(prompt) / t_prefill, (int(sys.argv[3]) - 1) / (time.perf_counter() - start)]))
"""


def bench_llama_cpp(batch: int) -> tuple[float, float] | str | None:
    """llama.cpp at batch 1 in a child process (its OpenMP runtime and torch's stay apart, and a
    crash of the native library is reported instead of ending the benchmark)."""
    if batch != 1 or importlib.util.find_spec("llama_cpp") is None:
        return None
    from tests.helpers import default_model_dir

    prompt = json.dumps(_prompts(1, seed=batch)[0])
    proc = subprocess.run([sys.executable, "-c", _LLAMA_CPP, str(default_model_dir() / GGUF),
                           prompt, str(NEW_TOKENS)], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"failed (exit status {proc.returncode}): {proc.stderr.strip()[-200:]}"
    prefill, decode = json.loads(proc.stdout.strip().splitlines()[-1])
    return prefill, decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--gguf-keep-quantized", action="store_true",
                        help="run the Q4_1 linears from their blocks (int4 GEMV in bf16)")
    parser.add_argument("--cpu-default", action="store_true",
                        help="what `hearth serve` picks on this CPU (--dtype auto with the CPU "
                             "fast path, engine/cpu_precision.py); overrides --dtype and "
                             "--gguf-keep-quantized")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--model", default=None, help="a model directory or .gguf (Hearth only)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate Hearth and llama.cpp this many times at each batch (a "
                             "neighbour's load on a shared host then falls on both alike) and "
                             "print the median decode ratio")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, commit {commit}, "
          f"{time.strftime('%Y-%m-%d')}")
    precision = dict(dtype=args.dtype, gguf_keep_quantized=args.gguf_keep_quantized)
    if args.cpu_default:
        precision = dict(dtype="auto", cpu_fast_path=True)
    llm = LLM(args.model, device="cpu", progress=False, enable_prefix_caching=False,
              max_num_batched_tokens=2048, **precision)
    name = f"hearth {llm.engine.precision}"
    if args.model:
        name += f" {Path(args.model).name}"
    bench_hearth(llm, 1)  # warm-up
    rows = []
    ratios: dict[int, list[float]] = {}
    for batch in args.batch:
        for _ in range(args.rounds):
            ours = bench_hearth(llm, batch)
            rows.append((name, batch, *ours))
            if args.model:
                continue  # the others run the default model's GGUF
            if not args.skip_transformers:
                rows.append(("transformers float32", batch, *bench_transformers(batch)))
            cpp = bench_llama_cpp(batch)
            if isinstance(cpp, str):
                print(f"llama.cpp {cpp}")
            elif cpp:
                rows.append(("llama.cpp Q4_1", batch, *cpp))
                ratios.setdefault(batch, []).append(ours[1] / cpp[1])
    print("| backend | batch | prefill tok/s | decode tok/s |")
    print("|---|---|---|---|")
    for name, batch, prefill, decode in rows:
        print(f"| {name} | {batch} | {prefill:.0f} | {decode:.1f} |")
    for batch, r in ratios.items():
        print(f"decode against llama.cpp at batch {batch}: median {statistics.median(r):.2f}x "
              f"over {len(r)} rounds (each {', '.join(f'{x:.2f}' for x in r)})")


if __name__ == "__main__":
    main()
