"""GPU timings of the quantized linears and of W5 (`python bench/quant.py gpu ...`, or this file
directly with the same flags): per-linear kernel times inside CUDA graphs with the weights rotated
out of L2, GEMV block sweeps checked against the reference, int4 at M > 16 (int_mma blocks,
dequantized copy, bf16), and W5 (Llama-3-8B, batch 1, 128 in / 256 out) bf16 vs int4.

`--gemm` ends with a per-M choice (int_mma's blocks or the dequantized copy); to run a workload
with it before the table in kernels/quant/int_mma.py is edited, call
`apply_gemm_choice(json.load(open(F))["gemm"]["choice"])`, then bench/throughput.py's main.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hearth.engine.quantization.int_layout import unpack  # noqa: E402
from hearth.kernels.quant.int4_frag import frag_pack  # noqa: E402

LLAMA3_8B_LINEARS = (("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672),
                     ("down", 14336, 4096))


def _int4_copies(k: int, n: int, device: str, copies: int) -> list[tuple]:
    """`copies` AWQ-style int4 weights (group 128): cycling through them keeps the L2 cold."""
    from hearth.engine.quantization.int_layout import default_g_idx, pack

    qweight = pack(torch.randint(0, 16, (k, n)), 4, dim=0).to(device)
    out = []
    for _ in range(copies):
        zeros = torch.randint(0, 16, (k // 128, n), dtype=torch.uint8, device=device)
        scales = torch.rand(k // 128, n, dtype=torch.float16, device=device) * 0.01 + 0.001
        out.append((qweight.clone(), zeros, scales, default_g_idx(k, 128, device)))
    return out


def _int4_ref(x: torch.Tensor, qweight, zeros, scales, g_idx) -> torch.Tensor:
    """The kernels' reference: the int layout dequantized by its format code, then x @ W^T."""
    from hearth.engine.quantization.int_layout import dequantize_int_layout
    from hearth.kernels.quant.quant_gemm import dequantized_matmul_ref

    w_t = dequantize_int_layout(qweight, zeros, scales, g_idx, 4)  # (K, N)
    return dequantized_matmul_ref(x, w_t.t())


def _copies(nbytes: int) -> int:
    return max(2, -(-3 * 60 * 2**20 // nbytes))  # >= 3x the H100/H200 L2 (50/60 MB)


def _int4_bytes(k: int, n: int) -> int:
    return k * n // 2 + (k // 128) * n * 3  # packed nibbles, fp16 scales, uint8 zeros


def bench_kernels(device: str = "cuda", dtype=torch.bfloat16, ms=(1, 4, 8, 16, 256),
                  legacy: bool = False) -> list[dict]:
    """Llama-3-8B linears: int4 group 128 in the int layout (`int4`: GEMV for M <= 16, int_mma /
    dequantized copy above; `legacy`: also the old dequant-GEMM, `int4_gemm`), the same weights
    as fragment words (`int4_tc`: kernels/quant/int4_tc.py, what 16-bit models run), GGUF Q4_0
    blocks and bf16 F.linear; CUDA-graph replays, weights rotated out of L2."""
    rows = []
    for name, k, n in LLAMA3_8B_LINEARS:
        ws = _int4_copies(k, n, device, _copies(_int4_bytes(k, n)))
        raws = []
        for _ in range(_copies(n * k // 32 * 18)):
            raw = torch.randint(0, 256, (n, k // 32 * 18), dtype=torch.uint8, device=device)
            raw.view(n, -1, 18)[..., :2] = torch.tensor([0, 0x20], dtype=torch.uint8,
                                                        device=device)
            raws.append(raw)
        dense = [torch.randn(n, k, device=device, dtype=dtype) * 0.02
                 for _ in range(_copies(n * k * 2))]
        frags = [frag_pack(unpack(w[0], 4, dim=0)) for w in ws]
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=dtype)
            times = _time_linear(x, ws, frags, raws, dense, legacy)
            row = {"linear": name, "M": m, **{f"{k_}_us": round(v * 1e6, 2)
                                              for k_, v in times.items()},
                   "int4_GBps": round(_int4_bytes(k, n) / times["int4"] / 1e9)}
            print(row, flush=True)
            rows.append(row)
    return rows


def _time_linear(x: torch.Tensor, ws: list, frags: list, raws: list, dense: list,
                 legacy: bool) -> dict[str, float]:
    import hearth.kernels.quant.quant_gemm as qg
    from hearth.kernels.quant.gguf_gemm import gguf_matmul
    from hearth.kernels.quant.int4_tc import frag_matmul

    counters = torch.zeros(ws[0][0].shape[1], dtype=torch.int32, device=x.device)

    def int4(i):
        return qg.int_quant_matmul(x, *ws[i % len(ws)], 4, 128, counters=counters)

    times = {"int4": _time_graph(int4)}
    times["int4_tc"] = _time_graph(lambda i: frag_matmul(
        x, frags[i % len(frags)], ws[i % len(ws)][1], ws[i % len(ws)][2], 128,
        counters=counters))
    if legacy and x.shape[0] <= 16:
        qg.GEMV_MAX_M, qg.LEGACY_GEMM = 0, True
        times["int4_gemm"] = _time_graph(int4)
        qg.GEMV_MAX_M, qg.LEGACY_GEMM = 16, False
    times["q4_0"] = _time_graph(lambda i: gguf_matmul(x, raws[i % len(raws)], "Q4_0"))
    times["bf16"] = _time_graph(lambda i: torch.nn.functional.linear(x, dense[i % len(dense)]))
    return times


def _gguf_raw(qtype: str, k: int, n: int, device: str) -> torch.Tensor:
    """(n, k) weights in qtype's blocks: random bytes, each block's float16 d (and m / dmin) set
    to 0.001 so that the values stay finite."""
    from hearth.engine.quantization.gguf_blocks import BLOCKS, SCALE_BYTES

    block, size = BLOCKS[qtype]
    raw = torch.randint(0, 256, (n, k // block, size), dtype=torch.uint8, device=device)
    half = torch.tensor([0.001], dtype=torch.float16).view(torch.uint8).to(device)
    for at in SCALE_BYTES[qtype]:
        raw[..., at:at + 2] = half
    return raw.reshape(n, -1)


def bench_gguf(device: str = "cuda", dtype=torch.bfloat16, ms=(1, 16, 256),
               qtypes=None) -> list[dict]:
    """GGUF block types through kernels/quant/gguf_gemm.py on the gate_up and down linears
    (CUDA-graph replays, weights rotated out of L2), bf16 F.linear beside them, and repacked into
    the int layout: the path GGUFLinear takes on CUDA."""
    from hearth.engine.quantization.gguf_blocks import BLOCKS, INT_LAYOUT_TYPES, to_int_layout
    from hearth.engine.quantization.int_layout import default_g_idx
    from hearth.kernels.quant.gguf_gemm import gguf_matmul
    from hearth.kernels.quant.quant_gemm import int_quant_matmul

    rows = []
    for name, k, n in LLAMA3_8B_LINEARS[2:]:
        dense = [torch.randn(n, k, device=device, dtype=dtype) * 0.02
                 for _ in range(_copies(n * k * 2))]
        counters = torch.zeros(n, dtype=torch.int32, device=device)
        for qtype, (block, size) in BLOCKS.items():
            if qtypes and qtype not in qtypes:
                continue
            nbytes = n * k // block * size
            raws = [_gguf_raw(qtype, k, n, device) for _ in range(_copies(nbytes))]
            if qtype in INT_LAYOUT_TYPES:
                ints = [to_int_layout(r, qtype, k) for r in raws]
                g_idx = default_g_idx(k, ints[0][4], device)
            for m in ms:
                x = torch.randn(m, k, device=device, dtype=dtype)
                t = _time_graph(lambda i, x=x, r=raws, q=qtype: gguf_matmul(x, r[i % len(r)], q))
                bf16 = _time_graph(lambda i, x=x, d=dense: torch.nn.functional.linear(
                    x, d[i % len(d)]))
                row = {"linear": name, "qtype": qtype, "M": m, "us": round(t * 1e6, 1),
                       "GBps": round(nbytes / t / 1e9), "bf16_us": round(bf16 * 1e6, 1)}
                if qtype in INT_LAYOUT_TYPES:  # what GGUFLinear runs on CUDA
                    row["int_layout_us"] = round(_time_graph(
                        lambda i, x=x, r=ints, g=g_idx, c=counters: int_quant_matmul(
                            x, *r[i % len(r)][:3], g, *r[0][3:5], counters=c, offset=r[0][5])
                    ) * 1e6, 1)
                print(row, flush=True)
                rows.append(row)
    return rows


GEMV_CANDIDATES = {  # (block_n, block_k, num_warps), each with every entry of GEMV_WAVES
    1: [(512, 64, 4), (1024, 64, 4), (256, 64, 2), (512, 128, 4), (512, 64, 2), (1024, 128, 8),
        (256, 128, 2), (1024, 64, 8)],
    16: [(256, 128, 4), (128, 64, 1), (512, 64, 4), (256, 64, 2)],
}
GEMV_WAVES = (1, 2, 4)


def sweep_gemv(device: str = "cuda", dtype=torch.bfloat16, ms=(1, 16), top: int = 8,
               waves=GEMV_WAVES) -> dict[int, dict]:
    """The first `top` GemvBlocks candidates (x `waves`) for each M in `ms` on the four Llama-3-8B
    linears; the best by their summed time (each linear runs once per layer) among those that
    match the reference."""
    from hearth.kernels.quant.int_gemv import GemvBlocks, int_gemv

    data = {name: (k, n, _int4_copies(k, n, device, _copies(_int4_bytes(k, n))))
            for name, k, n in LLAMA3_8B_LINEARS}
    best = {}
    for m in ms:
        candidates = GEMV_CANDIDATES[m][:top]
        xs = {name: torch.randn(m, k, device=device, dtype=dtype)
              for name, (k, _, _) in data.items()}
        refs = {name: _int4_ref(xs[name].float(), *ws[0])
                for name, (_, _, ws) in data.items()}
        results = []
        for bn, bk, warps in candidates:
            for w in waves:
                blocks = GemvBlocks(bn, bk, warps, w)
                per, err = {}, 0.0
                for name, (_, n, ws) in data.items():
                    x, c = xs[name], torch.zeros(n, dtype=torch.int32, device=device)
                    out = int_gemv(x, *ws[0][:3], 4, 128, counters=c, blocks=blocks).float()
                    err = max(err, ((out - refs[name]).norm() / refs[name].norm()).item())
                    per[name] = _time_graph(lambda i, x=x, ws=ws, c=c, b=blocks: int_gemv(
                        x, *ws[i % len(ws)][:3], 4, 128, counters=c, blocks=b)) * 1e6
                if err < 1e-2:
                    results.append((sum(per.values()), blocks, per))
                print(f"M={m} {blocks}: total {sum(per.values()):.1f} us rel_err {err:.1e} "
                      + " ".join(f"{k_} {v:.1f}" for k_, v in per.items()), flush=True)
        if results:
            total, blocks, per = min(results, key=lambda r: r[0])
            best[m] = {"blocks": blocks.__dict__, "total_us": round(total, 2),
                       **{f"{k_}_us": round(v, 2) for k_, v in per.items()}}
            print(f"M={m} best: {best[m]}", flush=True)
    return best


# int_mma candidates per M (GemmBlocks fields: block_m, block_n, block_k, num_warps, num_stages,
# f32_dequant, split); M beyond these is timed with the last M's best blocks.
GEMM_CANDIDATES = {
    32: [(64, 64, 128, 4, 4, True, True), (64, 64, 128, 8, 2, True, True),
         (64, 64, 128, 8, 3, True, True), (64, 64, 128, 4, 3, True, True),
         (64, 32, 128, 4, 3, True, True), (64, 64, 128, 8, 2, False, True)],
    128: [(128, 64, 128, 4, 3, True, True), (128, 64, 128, 8, 2, True, True),
          (64, 64, 128, 8, 2, True, True), (128, 64, 64, 4, 3, True, True),
          (128, 128, 64, 8, 2, True, True)],
    256: [(128, 128, 64, 8, 3, True, False), (128, 64, 128, 8, 2, True, False),
          (128, 128, 64, 8, 2, True, False)],
}
GEMM_CANDIDATES[64] = GEMM_CANDIDATES[32]
GEMM_MS = (32, 64, 128, 256, 1024, 4096)


def bench_gemm(device: str = "cuda", dtype=torch.bfloat16, ms=GEMM_MS,
               linears=LLAMA3_8B_LINEARS, time_fn=None) -> dict:
    """M > 16 over the four Llama-3-8B linears (int4 group 128, bf16 x): per M, every
    GEMM_CANDIDATES blocks for int_mma (checked against the reference, timed, summed over the
    linears), then per linear the old per-element kernel (M <= 256), int_mma with the best
    blocks, int_dequant_matmul and bf16 F.linear. `choice`: per M the faster int4 path by the
    summed time (each linear runs once per layer), with int_mma's best blocks."""
    import hearth.kernels.quant.int_mma as mma

    time_fn = time_fn or _time_graph
    data = {}
    for name, k, n in linears:
        dense = [torch.randn(n, k, device=device, dtype=dtype) * 0.02
                 for _ in range(_copies(n * k * 2))]
        data[name] = (k, n, _int4_copies(k, n, device, _copies(_int4_bytes(k, n))), dense)
        mma.reserve_dequant_scratch(k * n)
    report = {"rows": [], "sweep": {}, "choice": {}}
    best = None
    for m in ms:
        xs = {name: torch.randn(m, k, device=device, dtype=dtype) for name, (k, *_) in data.items()}
        candidates = [mma.GemmBlocks(*c) for c in GEMM_CANDIDATES.get(m, [])] or [best]
        results = []
        for blocks in candidates:
            per, err = _time_mma(xs, data, blocks, time_fn)
            report["sweep"].setdefault(m, []).append(
                {"blocks": blocks.__dict__, "total_us": round(sum(per.values()), 2),
                 "rel_err": err})
            print(f"M={m} {blocks}: total {sum(per.values()):.1f} us rel_err {err:.1e} "
                  + " ".join(f"{k_} {v:.1f}" for k_, v in per.items()), flush=True)
            if err < 1e-2:
                results.append((sum(per.values()), blocks, per))
        if not results:
            raise RuntimeError(f"no int_mma candidate matched the reference at M={m}")
        _, best, mma_us = min(results, key=lambda r: r[0])
        report["choice"][m] = _time_paths(m, xs, data, (best, mma_us), time_fn, report["rows"])
    return report


def _time_mma(xs: dict, data: dict, blocks, time_fn) -> tuple[dict[str, float], float]:
    """int_mma with `blocks` on each linear: us per call, and the largest relative error."""
    from hearth.kernels.quant.int_mma import int_mma

    per, err = {}, 0.0
    for name, (_, n, ws, _) in data.items():
        x, c = xs[name], torch.zeros(n, dtype=torch.int32, device=xs[name].device)
        out = int_mma(x, *ws[0], 4, 128, blocks=blocks, counters=c).float()
        ref = _int4_ref(x.float(), *ws[0])
        err = max(err, ((out - ref).norm() / ref.norm()).item())
        per[name] = time_fn(lambda i, x=x, ws=ws, c=c: int_mma(
            x, *ws[i % len(ws)], 4, 128, blocks=blocks, counters=c)) * 1e6
    return per, err


def _time_paths(m: int, xs: dict, data: dict, mma: tuple, time_fn, rows: list) -> dict:
    """Each path on each linear (a row each, appended to rows); the totals and the choice."""
    import hearth.kernels.quant.int_mma as mma
    import hearth.kernels.quant.quant_gemm as qg

    blocks, mma_us = mma
    totals = {"old": 0.0, "mma": 0.0, "dequant": 0.0, "bf16": 0.0}
    for name, (_, _, ws, dense) in data.items():
        x = xs[name]
        row = {"linear": name, "M": m, "mma_us": round(mma_us[name], 2)}
        if m <= 256:
            qg.LEGACY_GEMM = True
            row["old_us"] = time_fn(lambda i, x=x, ws=ws: qg.int_quant_matmul(
                x, *ws[i % len(ws)], 4, 128)) * 1e6
            qg.LEGACY_GEMM = False
        row["dequant_us"] = time_fn(lambda i, x=x, ws=ws: mma.int_dequant_matmul(
            x, *ws[i % len(ws)], 4, 128)) * 1e6
        row["bf16_us"] = time_fn(lambda i, x=x, d=dense: torch.nn.functional.linear(
            x, d[i % len(d)])) * 1e6
        for key in totals:
            totals[key] += row.get(f"{key}_us", 0.0)
        rows.append({k_: round(v, 2) if isinstance(v, float) else v for k_, v in row.items()})
        print(rows[-1], flush=True)
    path = "mma" if totals["mma"] <= totals["dequant"] else "dequant"
    choice = {"path": path, "blocks": blocks.__dict__,
              **{f"{k_}_us": round(v, 2) for k_, v in totals.items()}}
    print(f"M={m} totals: {choice}", flush=True)
    return choice


def apply_gemm_choice(choice: dict) -> None:
    """Point kernels/quant/quant_gemm.py's GEMM_BLOCKS at bench_gemm's choice (keys M, as int or as
    JSON strings), to run a workload with it: int_mma up to each M where it won, else None."""
    import hearth.kernels.quant.int_mma as mma

    table = []
    for m in sorted(choice, key=int):
        c = choice[m]
        table.append((int(m), mma.GemmBlocks(**c["blocks"]) if c["path"] == "mma" else None))
    while table and table[-1][1] is None:  # beyond the table is int_dequant_matmul anyway
        table.pop()
    mma.GEMM_BLOCKS = tuple(table)
    print("GEMM_BLOCKS =", mma.GEMM_BLOCKS, flush=True)


def print_gemm(report: dict) -> None:
    print(f"\n{'M':>5} {'linear':8} {'old':>9} {'int_mma':>9} {'dequant':>9} {'bf16':>9}  (us)")
    for r in report["rows"]:
        old = f"{r['old_us']:9.1f}" if "old_us" in r else f"{'-':>9}"
        print(f"{r['M']:5d} {r['linear']:8} {old} {r['mma_us']:9.1f} {r['dequant_us']:9.1f} "
              f"{r['bf16_us']:9.1f}")
    for m, c in report["choice"].items():
        print(f"M={m}: {c['path']} (sum: old {c['old_us']:.0f}, int_mma {c['mma_us']:.0f}, "
              f"dequant {c['dequant_us']:.0f}, bf16 {c['bf16_us']:.0f} us) blocks {c['blocks']}")


def _time_graph(fn, reps: int = 24) -> float:
    """Seconds per call of fn(i), i = 0..reps-1, from replays of one CUDA graph of reps calls
    (no launch overhead: decode replays graphs too)."""
    fn(0)  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(i)
    graph.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    return sorted(times)[len(times) // 2]


def int4_config_dir(config_dir: Path, work: Path, group_size: int = 128) -> Path:
    """A copy of config_dir whose config.json declares AWQ int4 (dummy weights load into it)."""
    import shutil

    quant_dir = work / "int4-config"
    quant_dir.mkdir(parents=True, exist_ok=True)
    for f in config_dir.iterdir():
        if f.is_file():
            shutil.copyfile(f, quant_dir / f.name)
    config = json.loads((config_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size,
                                     "zero_point": True, "version": "gemm"}
    (quant_dir / "config.json").write_text(json.dumps(config))
    return quant_dir


def bench_decode(config_dir: Path, work: Path, device: str = "cuda", group_size: int = 128,
                 tuned: dict | None = None,
                 runs=("bf16", "int4_gemm", "int4_gemv", "int4_plain", "int4", "int4_tuned")
                 ) -> dict:
    """W5 with random weights: batch 1, 128 in / 256 out; bf16, AWQ int4 (group 128) through the
    old dequant-GEMM (`int4_gemm`), the int layout's decode GEMV (`int4_gemv`; `int4_tuned` with
    the GemvBlocks of `tuned`, {M: blocks dict}, as sweep_gemv finds them) and fragment words on
    the tensor-core kernel (`int4`: what a 16-bit model runs, kernels/quant/int4_tc.py; `int4_plain`
    the same with every kernel launched without PDL, kernels/pdl.py)."""
    import hearth.kernels.quant.int4_tc as int4_tc
    import hearth.kernels.quant.int_gemv as ig
    import hearth.kernels.quant.quant_gemm as qg
    from hearth import LLM, SamplingParams
    from hearth.kernels import pdl

    quant_dir = int4_config_dir(config_dir, work, group_size)
    config = json.loads((config_dir / "config.json").read_text())
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, min(10000, config["vocab_size"]), (128,), generator=gen).tolist()
    params = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
    plan = [("bf16", config_dir, None), ("int4_gemm", quant_dir, None),
            ("int4_gemv", quant_dir, None), ("int4_plain", quant_dir, None),
            ("int4", quant_dir, None)]
    if tuned and any(ig.GemvBlocks(**b) != ig.default_blocks(m) for m, b in tuned.items()):
        plan.append(("int4_tuned", quant_dir, {m: ig.GemvBlocks(**b) for m, b in tuned.items()}))
    default_blocks = ig.default_blocks
    result = {}
    for label, path, blocks in [p for p in plan if p[0] in runs]:
        qg.GEMV_MAX_M = 0 if label == "int4_gemm" else 16
        int4_tc.ENABLED = label in ("bf16", "int4", "int4_plain")  # fragment words (int4_tc.py)
        pdl.ENABLED = label != "int4_plain"
        qg.LEGACY_GEMM = label == "int4_gemm"
        ig.default_blocks = default_blocks if blocks is None else (
            lambda m, blocks=blocks: blocks.get(m) or default_blocks(m))
        result[label] = _decode_once(LLM, path, device, prompt, params)
        print(label, result[label], flush=True)
    qg.GEMV_MAX_M, qg.LEGACY_GEMM, ig.default_blocks = 16, False, default_blocks
    int4_tc.ENABLED, pdl.ENABLED = True, True
    return result


def _decode_once(llm_cls, path: Path, device: str, prompt: list[int], params) -> dict:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    llm = llm_cls(str(path), device=device, load_format="dummy", progress=False,
                  kv_cache_gib=2.0 if device == "cuda" else 0.05, max_model_len=512)
    weights = sum(t.numel() * t.element_size() for t in
                  [*llm.engine.runner.model.parameters(), *llm.engine.runner.model.buffers()])
    llm.generate([prompt], params, use_tqdm=False)  # warm-up (compiles, graphs)
    start = time.perf_counter()
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    elapsed = time.perf_counter() - start
    llm.shutdown()
    return {"ms_per_token": elapsed / len(out.outputs[0].token_ids) * 1e3,
            "weight_GiB": weights / 2**30}


def run_gpu(args) -> dict:
    """Sweep (optional), W5 decode, per-linear table; the JSON is rewritten after each stage."""
    report = {"device": torch.cuda.get_device_name()}

    def save():
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))

    if args.gguf:
        report["gguf"] = bench_gguf(qtypes=args.gguf_types)
        save()
        return report
    if args.gemm:
        report["gemm"] = bench_gemm(ms=args.gemm_m)
        save()
        print_gemm(report["gemm"])
        return report
    if args.sweep:
        report["gemv_sweep"] = sweep_gemv(ms=args.sweep_m, top=args.sweep_top,
                                          waves=args.sweep_waves)
        save()
    tuned = {m: r["blocks"] for m, r in report.get("gemv_sweep", {}).items()}
    report["decode_w5"] = bench_decode(args.config, args.work, tuned=tuned, runs=args.runs)
    save()
    if not args.no_kernels:
        report["kernels"] = bench_kernels(ms=args.kernel_m)
        save()
    print(json.dumps(report, indent=2))
    return report


def add_arguments(g: argparse.ArgumentParser) -> None:
    g.add_argument("--config", type=Path,
                   default=Path(__file__).resolve().parent / "configs" / "llama-3-8b")
    g.add_argument("--work", type=Path, default=Path("/tmp/hearth-quant-bench"))
    g.add_argument("--json", type=Path, default=None)
    g.add_argument("--sweep", action="store_true", help="time GemvBlocks candidates first")
    g.add_argument("--no-kernels", action="store_true", help="skip the per-linear table")
    g.add_argument("--gemm", action="store_true",
                   help="only M > 16: int_mma blocks sweep, old / int_mma / dequant / bf16")
    g.add_argument("--gguf", action="store_true",
                   help="only the GGUF block types (Q4_0 ... Q6_K) on gate_up and down")
    g.add_argument("--gguf-types", nargs="+", default=None, help="with --gguf: these types only")
    g.add_argument("--gemm-m", type=int, nargs="+", default=list(GEMM_MS))
    g.add_argument("--sweep-m", type=int, nargs="+", default=[1, 16])
    g.add_argument("--kernel-m", type=int, nargs="+", default=[1, 4, 8, 16, 256],
                   help="rows of the per-linear table")
    g.add_argument("--sweep-top", type=int, default=8, help="candidates per M")
    g.add_argument("--sweep-waves", type=int, nargs="+", default=list(GEMV_WAVES))
    g.add_argument("--runs", nargs="+",
                   default=["bf16", "int4_gemv", "int4_plain", "int4", "int4_tuned"],
                   help="W5 runs (also: int4_gemm, the old dequant-GEMM: ~19 ms/token)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run_gpu(parser.parse_args())
