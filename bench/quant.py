"""Quantization quality and real-tool checks for the default model (SmolLM2-135M-Instruct).

    python bench/quant.py export-float DST        # the GGUF, dequantized, as an HF float dir
    python bench/quant.py perplexity --work DIR   # float vs RTN vs GPTQ vs AWQ (4 bits, group 64)
    python bench/quant.py tool-check --work DIR   # gptqmodel / llmcompressor outputs vs Hearth
    python bench/quant.py gpu [--config DIR]      # int4 / GGUF kernels and W4 int4 vs bf16 (CUDA)

`perplexity` quantizes the float dir with `hearth quantize` (engine/quantization/algorithms.py),
loads every checkpoint in Hearth (packed weights, reference matmul on CPU) and measures perplexity
on the held-out part of engine/quantization/calibration.txt. `tool-check` expects the tools'
checkpoints in DIR/gptqmodel and DIR/llmcompressor (made by bench/quant_tools.py in the tools' own
venvs) and their logits in DIR/*/logits.pt; it compares Hearth's logits to them.
Results go to docs/benchmarks.md, "Quantization quality".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def export_float(dst: Path) -> Path:
    """Write the default model's GGUF, dequantized to float32, as an HF directory."""
    import transformers
    from safetensors.torch import save_file

    from engine.loader import load_gguf
    from tests.helpers import DEFAULT_GGUF, default_model_dir

    src = default_model_dir() / DEFAULT_GGUF
    gguf = load_gguf(src)
    c = gguf.config
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.contiguous() for name, t in gguf.weights()}
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta, max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_ids[0], torch_dtype="float32",
    )
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(dst)
    tok = transformers.AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    tok.save_pretrained(dst)
    return dst


def run_perplexity(work: Path, group_size: int, num_samples: int) -> dict[str, float]:
    from appliance.quantize import QuantizeOptions, quantize
    from engine.quantization.calibration import eval_token_ids, load_float_model, perplexity

    float_dir = work / "float"
    if not (float_dir / "config.json").is_file():
        export_float(float_dir)
    results = {}
    ids = eval_token_ids(float_dir)
    results["float"] = perplexity(load_float_model(float_dir), ids)
    print(f"float: {results['float']:.3f}", flush=True)
    for method in ("rtn", "gptq", "awq"):
        out = work / f"{method}-g{group_size}"
        if not (out / "config.json").is_file():
            t0 = time.perf_counter()
            quantize(QuantizeOptions(method, 4, group_size, num_samples=num_samples),
                     float_dir, out)
            print(f"{method}: quantized in {time.perf_counter() - t0:.0f} s", flush=True)
        results[method] = perplexity(load_float_model(out), ids)
        print(f"{method}: {results[method]:.3f}", flush=True)
    (work / "perplexity.json").write_text(json.dumps(results, indent=2))
    return results


def run_tool_check(work: Path) -> dict[str, float]:
    """Hearth's logits on the tools' checkpoints vs the tools' own (transformers) logits."""
    from engine.quantization.calibration import load_float_model

    report = {}
    for tool in ("gptqmodel", "llmcompressor"):
        ckpt = work / tool
        ref_file = ckpt / "logits.pt"
        if not ref_file.is_file():
            print(f"{tool}: no {ref_file}; run bench/quant_tools.py in the tool's venv first")
            continue
        ref = torch.load(ref_file)
        model = load_float_model(ckpt)
        with torch.no_grad():
            ours = model_logits(model, ref["input_ids"])
        report[tool] = {"layer": type(model.layers[0].self_attn.qkv_proj).__name__,
                        "tool_layer": ref.get("loader"),
                        "logit_scale": ref["logits"].abs().mean().item()}
        for key in ("logits", "logits_dequant"):
            if key in ref:
                report[tool][key] = compare_logits(ours, ref[key])
        print(tool, report[tool], flush=True)
    (work / "tool_check.json").write_text(json.dumps(report, indent=2))
    return report


def compare_logits(ours: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    diff = (ours - ref).abs()
    return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(),
            "argmax_agreement": (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()}


def model_logits(model, input_ids: list[int]) -> torch.Tensor:
    from engine.quantization.calibration import forward_dense

    return forward_dense(model, torch.tensor(input_ids))


def bench_kernels(device: str = "cuda", dtype=torch.bfloat16) -> list[dict]:
    """Llama-3-8B linears at M = 1, 16, 256: int4 (group 128), Q4_0 and bf16 F.linear."""
    from kernels.int_pack import default_g_idx, pack
    from kernels.quant_gemm import gguf_matmul, int_quant_matmul

    rows = []
    for name, k, n in (("qkv", 4096, 6144), ("gate_up", 4096, 28672), ("down", 14336, 4096)):
        qweight = pack(torch.randint(0, 16, (k, n)), 4, dim=0).to(device)
        zeros = torch.full((k // 128, n), 8, dtype=torch.uint8, device=device)
        scales = torch.full((k // 128, n), 0.01, dtype=torch.float16, device=device)
        g_idx = default_g_idx(k, 128, device)
        raw = torch.randint(0, 256, (n, k // 32 * 18), dtype=torch.uint8, device=device)
        raw.view(n, -1, 18)[..., :2] = torch.tensor([0, 0x20], dtype=torch.uint8, device=device)
        dense = torch.randn(n, k, device=device, dtype=dtype) * 0.02
        for m in (1, 16, 256):
            x = torch.randn(m, k, device=device, dtype=dtype)
            times = {  # noqa: B023 below: each lambda runs before the loop moves on
                "int4": _time(lambda: int_quant_matmul(x, qweight, zeros, scales, g_idx,  # noqa: B023
                                                       4, 128)),
                "q4_0": _time(lambda: gguf_matmul(x, raw, "Q4_0")),  # noqa: B023
                "bf16": _time(lambda: torch.nn.functional.linear(x, dense)),  # noqa: B023
            }
            row = {"linear": name, "M": m, **{f"{k_}_us": v * 1e6 for k_, v in times.items()},
                   "int4_GBps": (qweight.numel() * 4 + scales.numel() * 2) / times["int4"] / 1e9}
            print(row, flush=True)
            rows.append(row)
    return rows


def _time(fn, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def bench_decode(config_dir: Path, work: Path, device: str = "cuda", group_size: int = 128) -> dict:
    """W4 with random weights: batch 1, 128 in / 256 out, bf16 vs AWQ int4 (group 128)."""
    import shutil

    from engine import LLM, SamplingParams

    quant_dir = work / "int4-config"
    quant_dir.mkdir(parents=True, exist_ok=True)
    for f in config_dir.iterdir():
        if f.is_file():
            shutil.copyfile(f, quant_dir / f.name)
    config = json.loads((config_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size,
                                     "zero_point": True, "version": "gemm"}
    (quant_dir / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, min(10000, config["vocab_size"]), (128,), generator=gen).tolist()
    params = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
    result = {}
    for label, path in (("bf16", config_dir), ("int4", quant_dir)):
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        llm = LLM(str(path), device=device, load_format="dummy", progress=False,
                  kv_cache_gib=2.0 if device == "cuda" else 0.05, max_model_len=512)
        weights = sum(t.numel() * t.element_size() for t in
                      [*llm.engine.runner.model.parameters(), *llm.engine.runner.model.buffers()])
        llm.generate([prompt], params, use_tqdm=False)  # warm-up (compiles, graphs)
        start = time.perf_counter()
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        elapsed = time.perf_counter() - start
        result[label] = {"ms_per_token": elapsed / len(out.outputs[0].token_ids) * 1e3,
                         "weight_GiB": weights / 2**30}
        print(label, result[label], flush=True)
        llm.shutdown()
        del llm
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("export-float").add_argument("dst", type=Path)
    p = sub.add_parser("perplexity")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--num-samples", type=int, default=32)
    sub.add_parser("tool-check").add_argument("--work", type=Path, required=True)
    g = sub.add_parser("gpu")
    g.add_argument("--config", type=Path,
                   default=Path(__file__).resolve().parent / "configs" / "llama-3-8b")
    g.add_argument("--work", type=Path, default=Path("/tmp/hearth-quant-bench"))
    g.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.cmd == "export-float":
        print(export_float(args.dst))
    elif args.cmd == "perplexity":
        print(json.dumps(run_perplexity(args.work, args.group_size, args.num_samples), indent=2))
    elif args.cmd == "tool-check":
        print(json.dumps(run_tool_check(args.work), indent=2))
    else:
        report = {"device": torch.cuda.get_device_name(), "kernels": bench_kernels(),
                  "decode_w4": bench_decode(args.config, args.work)}
        print(json.dumps(report, indent=2))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
