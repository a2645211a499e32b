"""GPU micro-benchmark of the attention kernels (median of triton.testing.do_bench).

Decode: batch 1/8/64/256 x context 512/2048/8192 with Llama-3-8B heads (32 query heads, 8 KV
heads, head_dim 128, bf16). Decode is memory bound, so it is scored against the bytes that must move
(every K/V row of the context read once) and the device's measured copy bandwidth.
Prefill: fresh prompts, scored in TFLOP/s of causal attention (QK^T + PV, half the square).
The torch reference (what the CPU engine runs) is timed beside each for scale.

    python bench/attention_kernels.py [--block-size 16] [--dtype bfloat16] [--skip-ref]
"""

import argparse
import sys
from functools import partial
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from hearth.kernels.paged_attention import (  # noqa: E402
    DecodeTile,
    _num_sms,
    choose_num_splits,
    paged_decode_attention,
    paged_decode_attention_ref,
)
from hearth.kernels.prefill_attention import (  # noqa: E402
    paged_prefill_attention,
    paged_prefill_attention_ref,
)

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128


def _setup(lens: list[int], block_size: int, dtype: torch.dtype) -> tuple:
    """Random cache + shuffled block tables for sequences of the given lengths."""
    needed = [-(-n // block_size) for n in lens]
    num_blocks = sum(needed)
    shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, dtype=dtype, device="cuda")
    v_cache = torch.randn(shape, dtype=dtype, device="cuda")
    perm = torch.randperm(num_blocks, device="cuda").int()
    tables = torch.zeros(len(lens), max(needed), dtype=torch.int32, device="cuda")
    start = 0
    for s, n in enumerate(needed):
        tables[s, :n] = perm[start : start + n]
        start += n
    return k_cache, v_cache, tables


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write), the practical ceiling."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def bench_decode(batch: int, context: int, args, ceiling: float) -> str:
    k_cache, v_cache, tables = _setup([context] * batch, args.block_size, args.dtype)
    query = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=args.dtype, device="cuda")
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    call = (query, k_cache, v_cache, tables, lens, HEAD_DIM**-0.5)
    out = torch.empty_like(query)
    ms = do_bench(lambda: paged_decode_attention(*call, out=out), return_mode="median")
    moved = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * args.dtype.itemsize  # K and V once
    gbps = moved / (ms * 1e-3) / 1e9
    splits = choose_num_splits(batch, NUM_KV_HEADS, tables.shape[1] * args.block_size,
                               _num_sms(query.device))
    ref = "-" if args.skip_ref else f"{_time_ref(paged_decode_attention_ref, call):9.3f}"
    return (f"{batch:6d} {context:8d} {splits:6d} {ms * 1e3:10.1f} {moved / 1e6:9.1f} "
            f"{gbps:8.0f} {100 * gbps * 1e9 / ceiling:6.0f}% {ref:>9}")


def sweep_decode_tiles(args, ceiling: float) -> None:
    """GB/s of each launch shape at two serving-sized batches (Qwen3-0.6B-like and Llama-3-8B)."""
    print("\ndecode tile sweep: batch context block_n warps stages  GB/s  of_copy")
    for batch, context in ((128, 1024), (256, 2048), (1, 2048)):
        k_cache, v_cache, tables = _setup([context] * batch, args.block_size, args.dtype)
        query = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=args.dtype, device="cuda")
        lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        out = torch.empty_like(query)
        moved = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * args.dtype.itemsize
        for block_n in (32, 64, 128):
            for warps in (4, 8):
                for stages in (2, 3):
                    tile = DecodeTile(block_n, warps, stages)
                    call = (query, k_cache, v_cache, tables, lens, HEAD_DIM**-0.5)
                    try:
                        fn = partial(paged_decode_attention, *call, out=out, tile=tile)
                        ms = do_bench(fn, return_mode="median")
                    except Exception as e:  # out of shared memory / registers for this shape
                        print(f"    {batch:5d} {context:7d} {block_n:7d} {warps:5d} {stages:6d}"
                              f"  failed: {type(e).__name__}")
                        continue
                    gbps = moved / (ms * 1e-3) / 1e9
                    print(f"    {batch:5d} {context:7d} {block_n:7d} {warps:5d} {stages:6d} "
                          f"{gbps:6.0f} {100 * gbps * 1e9 / ceiling:6.0f}%")


def bench_prefill(num_seqs: int, seq_len: int, args) -> str:
    k_cache, v_cache, tables = _setup([seq_len] * num_seqs, args.block_size, args.dtype)
    num_tokens = num_seqs * seq_len
    query = torch.randn(num_tokens, NUM_HEADS, HEAD_DIM, dtype=args.dtype, device="cuda")
    qsl = torch.arange(0, num_tokens + 1, seq_len, dtype=torch.int32, device="cuda")
    lens = torch.full((num_seqs,), seq_len, dtype=torch.int32, device="cuda")
    call = (query, k_cache, v_cache, tables, qsl, lens, HEAD_DIM**-0.5)
    out = torch.empty_like(query)
    ms = do_bench(lambda: paged_prefill_attention(*call, out=out), return_mode="median")
    flops = 4 * num_seqs * seq_len * seq_len / 2 * NUM_HEADS * HEAD_DIM  # causal: half of QK^T, PV
    ref = "-" if args.skip_ref else f"{_time_ref(paged_prefill_attention_ref, call):9.3f}"
    return f"{num_seqs:6d} {seq_len:8d} {ms:10.3f} {flops / (ms * 1e-3) / 1e12:8.1f} {ref:>9}"


def _time_ref(fn, call) -> float:
    return do_bench(lambda: fn(*call), warmup=5, rep=50, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--skip-ref", action="store_true", help="do not time the torch reference")
    parser.add_argument("--sweep", action="store_true", help="also sweep decode launch shapes")
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (Triton only interprets kernels on CPU)")
    ceiling = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {ceiling / 1e9:.0f} GB/s, "
          f"{args.dtype}, block_size {args.block_size}")
    print("\ndecode   batch  context splits    kernel_us  moved_MB     GB/s  of_copy    ref_ms")
    for batch in (1, 8, 64, 256):
        for context in (512, 2048, 8192):
            print("      ", bench_decode(batch, context, args, ceiling))
    if args.sweep:
        sweep_decode_tiles(args, ceiling)
    print("\nprefill   seqs  seq_len  kernel_ms  TFLOP/s    ref_ms")
    for num_seqs, seq_len in ((16, 512), (4, 2048), (1, 8192)):
        print("       ", bench_prefill(num_seqs, seq_len, args))


if __name__ == "__main__":
    main()
