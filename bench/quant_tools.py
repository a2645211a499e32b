"""Make reference quantized checkpoints of the default model with the real tools, in their venvs.

Runs inside a tool's own virtualenv (never the repo's): it imports no Hearth module.

    /tmp/venv-gptq/bin/python bench/quant_tools.py gptqmodel     FLOAT_DIR OUT_DIR CALIB_TXT
    /tmp/venv-llmc/bin/python bench/quant_tools.py llmcompressor FLOAT_DIR OUT_DIR CALIB_TXT

gptqmodel==7.6.0: GPTQ 4 bits, group 64, sym, no act-order. llmcompressor: compressed-tensors
W4A16 (int4 symmetric, group 64; 576 inputs do not divide by 128). After saving, the checkpoint is
loaded back with transformers (the tool's integration) and its float32 logits on a held-out text
are written to OUT_DIR/logits.pt for bench/quant.py tool-check to compare with Hearth.
"""

from __future__ import annotations

import os
import sys
import time

import torch  # noqa: E402

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
EVAL_MARKER = "==== held-out"


def calibration_texts(path: str) -> tuple[list[str], str]:
    text = open(path, encoding="utf-8").read()
    calib, _, held_out = text.partition(EVAL_MARKER)
    paragraphs = [p.strip() for p in calib.split("\n\n") if len(p.strip()) > 40]
    return paragraphs, held_out.split("\n", 1)[1]


def run_gptqmodel(float_dir: str, out_dir: str, texts: list[str]) -> None:
    from gptqmodel import GPTQModel, QuantizeConfig

    config = QuantizeConfig(bits=4, group_size=64, sym=True, desc_act=False)
    model = GPTQModel.load(float_dir, config)
    model.quantize(texts, batch_size=1)
    model.save(out_dir)


def run_llmcompressor(float_dir: str, out_dir: str, texts: list[str]) -> None:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(float_dir)
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
               "group_size": 64}
    recipe = QuantizationModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
        ignore=["lm_head"],
    )
    oneshot(model=model, recipe=recipe)
    model.save_pretrained(out_dir, save_compressed=True)
    tokenizer.save_pretrained(out_dir)


def save_reference_logits(out_dir: str, held_out: str) -> None:
    """The tool's own inference (transformers + the tool's linear layers), float32 activations.

    gptqmodel's default CPU kernel (aten int4pack) runs in bfloat16; its "train" mode dequantizes
    the weight and multiplies in the activation dtype. Both are saved: `logits` (default path) and
    `logits_dequant` (where the layer offers it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    ids = tokenizer(held_out[:1500])["input_ids"][:256]
    result = {"input_ids": ids}
    for key in ("logits", "logits_dequant"):
        model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
        layers = [m for m in model.modules() if hasattr(m, "linear_mode")]
        if key == "logits_dequant":
            if not layers:
                continue
            for m in layers:
                m.linear_mode = "train"
        with torch.no_grad():
            result[key] = model(torch.tensor([ids])).logits[0].float()
        result["loader"] = type(model.model.layers[0].self_attn.q_proj).__name__
    torch.save(result, os.path.join(out_dir, "logits.pt"))
    print("reference logits", sorted(result), "from", result["loader"], flush=True)


def main() -> None:
    tool, float_dir, out_dir, calib = sys.argv[1:5]
    torch.set_num_threads(2)
    texts, held_out = calibration_texts(calib)
    start = time.perf_counter()
    {"gptqmodel": run_gptqmodel, "llmcompressor": run_llmcompressor}[tool](float_dir, out_dir,
                                                                          texts)
    print(f"{tool}: quantized in {time.perf_counter() - start:.0f} s", flush=True)
    save_reference_logits(out_dir, held_out)


if __name__ == "__main__":
    main()
