"""Quantization quality and real-tool checks for the default model (SmolLM2-135M-Instruct).

    python bench/quant.py export-float DST        # the GGUF, dequantized, as an HF float dir
    python bench/quant.py perplexity --work DIR   # float vs RTN vs GPTQ vs AWQ (4 bits, group 64)
    python bench/quant.py tool-check --work DIR   # gptqmodel / llmcompressor outputs vs Hearth
    python bench/quant.py gpu [--config DIR] [--sweep]  # int4 / GGUF kernels, W5 (CUDA):
    python bench/quant.py gpu --gemm [--json F]         #   bench/quant_gpu.py

`perplexity` quantizes the float dir with `hearth quantize` (appliance/tools/quantizer/), loads
every checkpoint in Hearth (packed weights, reference matmul on CPU) and measures perplexity on the
held-out part of appliance/tools/quantizer/calibration.txt. `tool-check` expects the tools'
checkpoints in DIR/gptqmodel and DIR/llmcompressor (made by bench/quant_tools.py in the tools' own
venvs) and their logits in DIR/*/logits.pt; it compares Hearth's logits to them.
Results go to docs/benchmarks.md, "Quantization quality".
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import quant_gpu  # noqa: E402  (bench/quant_gpu.py: the `gpu` subcommand)
import torch


def export_float(dst: Path) -> Path:
    """Write the default model's GGUF, dequantized to float32, as an HF directory."""
    import transformers
    from safetensors.torch import save_file

    from hearth.engine.loader import load_gguf
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


def run_perplexity(work: Path, group_size: int, num_samples: int,
                   methods=("rtn", "gptq", "awq")) -> dict[str, float]:
    """Held-out perplexity of the float model and of each method's checkpoint (made once under
    `work`); "gptq-noact" is gptq with --no-act-order."""
    from hearth.appliance.tools.quantize import QuantizeOptions, quantize
    from hearth.appliance.tools.quantizer.calibration import (
        eval_token_ids,
        load_float_model,
        perplexity,
    )

    float_dir = work / "float"
    if not (float_dir / "config.json").is_file():
        export_float(float_dir)
    results = {}
    ids = eval_token_ids(float_dir)
    results["float"] = perplexity(load_float_model(float_dir), ids)
    print(f"float: {results['float']:.3f}", flush=True)
    for method in methods:
        out = work / f"{method}-g{group_size}"
        if not (out / "config.json").is_file():
            t0 = time.perf_counter()
            base = method.removesuffix("-noact")
            options = QuantizeOptions(base, 4, group_size, num_samples=num_samples,
                                      act_order=False if base != method else None)
            quantize(options, float_dir, out)
            print(f"{method}: quantized in {time.perf_counter() - t0:.0f} s", flush=True)
        results[method] = perplexity(load_float_model(out), ids)
        print(f"{method}: {results[method]:.3f}", flush=True)
    (work / "perplexity.json").write_text(json.dumps(results, indent=2))
    return results


def run_tool_check(work: Path) -> dict[str, float]:
    """Hearth's logits on the tools' checkpoints vs the tools' own (transformers) logits."""
    from hearth.appliance.tools.quantizer.calibration import load_float_model

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
    from hearth.appliance.tools.quantizer.calibration import forward_dense

    return forward_dense(model, torch.tensor(input_ids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("export-float").add_argument("dst", type=Path)
    p = sub.add_parser("perplexity")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq", "awq"],
                   choices=["rtn", "gptq", "gptq-noact", "awq"])
    sub.add_parser("tool-check").add_argument("--work", type=Path, required=True)
    quant_gpu.add_arguments(sub.add_parser("gpu", help="int4 / GGUF kernels and W5 (CUDA)"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.cmd == "export-float":
        print(export_float(args.dst))
    elif args.cmd == "perplexity":
        print(json.dumps(run_perplexity(args.work, args.group_size, args.num_samples,
                                        args.methods), indent=2))
    elif args.cmd == "tool-check":
        print(json.dumps(run_tool_check(args.work), indent=2))
    else:
        quant_gpu.run_gpu(args)


if __name__ == "__main__":
    main()
