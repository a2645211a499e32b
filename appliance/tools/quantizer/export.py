"""Write `hearth quantize`'s result as a standard checkpoint: AutoAWQ GEMM layout for awq, AutoGPTQ
layout (format "gptq", with g_idx) for gptq and rtn; safetensors plus config.json with its
quantization_config, and the source's tokenizer files.

Our fused linears are split back into the checkpoint's projections by rows (every quantity is
per output row, so splitting is exact).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from hearth.appliance.tools.quantizer.algorithms import QuantResult
from hearth.engine.quantization import awq, gptq
from hearth.engine.quantization.int_layout import default_g_idx

_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
           "generation_config.json", "chat_template.jinja", "tokenizer.model")


def write_checkpoint(model, results: dict[str, QuantResult], options, src: Path, dst: Path):
    dst.mkdir(parents=True, exist_ok=True)
    tensors = _float_tensors(model, results)
    for name, result in results.items():
        for hf_module, part in _split(model.config, name, result):
            tensors.update({f"{hf_module}.{k}": v for k, v in _pack(part, options).items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"] = quantization_config(options)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for name in _COPIED:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    return dst


def quantization_config(options) -> dict:
    if options.method == "awq":
        return {"quant_method": "awq", "bits": options.bits, "group_size": options.group_size,
                "zero_point": True, "version": "gemm", "modules_to_not_convert": None}
    return {"quant_method": "gptq", "bits": options.bits, "group_size": options.group_size,
            "desc_act": False, "sym": options.symmetric, "true_sequential": True,
            "checkpoint_format": "gptq", "quantizer": [f"hearth:{options.method}"]}


def _pack(r: QuantResult, options) -> dict[str, torch.Tensor]:
    if options.method == "awq":
        return awq.quantized_to_checkpoint(r.q, r.zeros, r.scales, options.bits)
    g_idx = default_g_idx(r.q.shape[1], r.group_size)
    return gptq.quantized_to_checkpoint(r.q, r.zeros, r.scales, g_idx, options.bits)


def _split(config, name: str, r: QuantResult):
    """Our fused module → (HF module name, its rows of the result)."""
    prefix = "model." + name.rsplit(".", 1)[0]
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    i = config.intermediate_size
    if name.endswith("qkv_proj"):
        parts = (("q_proj", 0, q), ("k_proj", q, kv), ("v_proj", q + kv, kv))
    elif name.endswith("gate_up_proj"):
        parts = (("gate_proj", 0, i), ("up_proj", i, i))
    else:
        return [("model." + name, r)]
    return [(f"{prefix}.{proj}", QuantResult(r.q[s : s + n], r.scales[s : s + n],
                                             r.zeros[s : s + n], r.group_size))
            for proj, s, n in parts]


def _float_tensors(model, results) -> dict[str, torch.Tensor]:
    """Everything not quantized, under its HF name (fused q/k/v biases split)."""
    out = {}
    c = model.config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    for name, param in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        if module in results and name.endswith(".weight"):
            continue
        hf = name if name.startswith("lm_head") else "model." + name
        if name.endswith("qkv_proj.bias"):
            base = hf.removesuffix("qkv_proj.bias")
            for proj, s, n in (("q_proj", 0, q), ("k_proj", q, kv), ("v_proj", q + kv, kv)):
                out[f"{base}{proj}.bias"] = param.data[s : s + n].clone()
        else:
            out[hf] = param.data.clone()
    return out
