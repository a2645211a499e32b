"""TTFT of a long system prompt after a restart: the persistent prefix cache vs recompute.

Three processes, so the restart is real (nothing survives in memory but the OS page cache):

    warm       a request with the system prompt fills --prefix-cache-dir, then the process exits
    disk       a fresh process with the same dir: a new question after the same system prompt;
               its prefix loads from disk (checked, read in parallel, copied to the device)
    recompute  a fresh process without the dir: the same request computes the whole prompt

TTFT is the time from add_request to the first sampled token, after one unrelated warm-up
request per process (kernel compilation and CUDA graphs are not counted). The system prompt is
`--prompt-tokens` random token ids (16k, or the model's context less 64 when that is shorter).
The block files stay in the page cache between the phases unless --drop-caches (root) empties it:
the numbers say which.

CPU, default model (context 8192):
    python bench/prefix_persist.py
GPU, Llama-3-8B shape with random weights (context 8192; Llama-3.1-8B's shape and RoPE for 16k):
    python bench/prefix_persist.py --device cuda --model bench/configs/llama-3-8b \
        --load-format dummy [--drop-caches]
    python bench/prefix_persist.py --device cuda --model bench/configs/llama-3.1-8b \
        --load-format dummy --max-model-len 16512
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _engine(args, cache_dir: str | None):
    from hearth.engine.config import EngineConfig
    from hearth.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(
        model=args.model, device=args.device, load_format=args.load_format,
        max_model_len=args.max_model_len, prefix_cache_dir=cache_dir,
        kv_cache_gib=args.kv_cache_gib, kv_cache_dtype=args.kv_cache_dtype), progress=False)


def _ttft(engine, request_id: str, token_ids: list[int]) -> float:
    from hearth.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    engine.add_request(request_id, token_ids, params)
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - start


def _prompts(args, vocab_size: int, max_len: int) -> tuple[list[int], list[int], list[int]]:
    """(warm-up prompt, system prompt + question 1, system prompt + question 2)."""
    rng = random.Random(0)
    n = min(args.prompt_tokens, max_len - 64)
    draw = lambda k: [rng.randrange(10, vocab_size - 10) for _ in range(k)]  # noqa: E731
    system = draw(n)
    return draw(256), system + draw(24), system + draw(24)


def run_phase(args) -> dict:
    cache_dir = None if args.phase == "recompute" else args.cache_dir
    engine = _engine(args, cache_dir)
    warmup, first, second = _prompts(args, engine.model_config.vocab_size, engine.max_model_len)
    _ttft(engine, "warmup", warmup)
    prompt = first if args.phase == "warm" else second
    ttft = _ttft(engine, args.phase, prompt)
    store = engine.prefix_store
    stats = store.stats if store is not None else None
    engine.shutdown()  # waits for the queued disk writes
    return {"phase": args.phase, "ttft_s": ttft, "prompt_tokens": len(prompt),
            "blocks_from_disk": stats.blocks_loaded_from_disk if stats else 0,
            "disk_read_s": stats.disk_read_s if stats else 0.0,
            "device": engine.device, "dtype": engine.dtype, "kv_cache_dtype": args.kv_cache_dtype}


def _spawn(args, phase: str, cache_dir: str) -> dict:
    cmd = [sys.executable, __file__, "--phase", phase, "--cache-dir", cache_dir,
           "--device", args.device, "--load-format", args.load_format,
           "--prompt-tokens", str(args.prompt_tokens), "--kv-cache-dtype", args.kv_cache_dtype]
    for name in ("model", "max_model_len", "kv_cache_gib"):
        if getattr(args, name) is not None:
            cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError as e:
        print(f"cannot drop the page cache ({e}): the block files may be cached", file=sys.stderr)
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--kv-cache-gib", type=float, default=None)
    parser.add_argument("--kv-cache-dtype", default="auto",
                        help="fp8 halves the bytes a block file holds (CUDA)")
    parser.add_argument("--prompt-tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=1, help="disk/recompute pairs")
    parser.add_argument("--drop-caches", action="store_true")
    parser.add_argument("--phase", choices=["warm", "disk", "recompute"], help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(run_phase(args)))
        return
    with tempfile.TemporaryDirectory(prefix="hearth-prefix-bench-") as cache_dir:
        results = [_spawn(args, "warm", cache_dir)]
        for _ in range(args.repeats):
            dropped = _drop_caches() if args.drop_caches else False
            results.append(_spawn(args, "disk", cache_dir) | {"page_cache_dropped": dropped})
            results.append(_spawn(args, "recompute", cache_dir))
    for r in results:
        print(json.dumps(r))
    disk = min(r["ttft_s"] for r in results if r["phase"] == "disk")
    recompute = min(r["ttft_s"] for r in results if r["phase"] == "recompute")
    print(f"{results[0]['device']} {results[0]['dtype']}, {results[1]['prompt_tokens']} prompt "
          f"tokens: TTFT disk {disk * 1e3:.0f} ms, recompute {recompute * 1e3:.0f} ms, "
          f"{recompute / disk:.1f}x")


if __name__ == "__main__":
    main()
