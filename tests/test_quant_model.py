"""Quantized checkpoints end to end: `hearth quantize` on a tiny random Llama, loaded in Hearth with
packed weights, gives the same greedy tokens as a float checkpoint made by dequantizing the same
packed weights; so do hand-made compressed-tensors and act-order GPTQ checkpoints; the default
model served from its Q4_1 blocks kept quantized gives the dequantized path's tokens."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_model
from safetensors.torch import load_file, save_file

from hearth import LLM, SamplingParams
from hearth.appliance.tools import quantize as quantize_cmd
from hearth.appliance.tools.quantizer.algorithms import rtn
from hearth.engine.layers.linear import GGUFLinear, IntQuantLinear
from hearth.engine.quantization import awq, compressed_tensors, gptq

PARAMS = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
PROJS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hearth")
    quantize_cmd.add_parser(parser.add_subparsers(dest="command"))
    return quantize_cmd.run(parser.parse_args(argv))


def _dequantized_copy(src: Path, dst: Path) -> Path:
    """A float checkpoint with the same weights the packed checkpoint holds."""
    config = json.loads((src / "config.json").read_text())
    qc = config.pop("quantization_config")
    tensors = load_file(src / "model.safetensors")
    out = {}
    for name, t in tensors.items():
        module, _, key = name.rpartition(".")
        if not module.endswith(PROJS):
            out[name] = t
            continue
        if key not in ("qweight", "weight_packed"):
            continue
        get = lambda k, module=module: tensors[f"{module}.{k}"]  # noqa: E731
        if qc["quant_method"] == "awq":
            w = awq.dequantize(t, get("qzeros"), get("scales"), qc["group_size"], qc["bits"])
        elif qc["quant_method"] == "gptq":
            w = gptq.dequantize(t, get("qzeros"), get("scales"), get("g_idx"), qc["bits"])
        else:
            weights = qc["config_groups"]["group_0"]["weights"]
            zp = tensors.get(f"{module}.weight_zero_point")
            w = compressed_tensors.dequantize(t, get("weight_scale"), weights["num_bits"], zp,
                                              weights["group_size"])
        out[f"{module}.weight"] = w
    dst.mkdir()
    save_file(out, dst / "model.safetensors")
    (dst / "config.json").write_text(json.dumps(config))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / f, dst / f)
    return dst


def _greedy(path: Path, expect_layer: type) -> list[list[int]]:
    llm = LLM(str(path), device="cpu", dtype="float32", progress=False)
    try:
        layer = llm.engine.runner.model.layers[0].self_attn.qkv_proj
        assert isinstance(layer, expect_layer)
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (5, 23)]
        return [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS, use_tqdm=False)]
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama")


@pytest.mark.parametrize("method", ["awq", "gptq", "rtn", "gptq --no-act-order"])
def test_hearth_quantize_matches_dequantized_float(tiny, tmp_path, method):
    method, *flags = method.split()
    dst = tmp_path / method
    assert _cli(["quantize", "--method", method, *flags, "--group-size", "32", "--num-samples",
                 "2", "--seq-len", "32", "--no-progress", str(tiny), str(dst)]) == 0
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == ("awq" if method == "awq" else "gptq")
    tensors = load_file(dst / "model.safetensors")
    assert tensors["model.layers.0.self_attn.q_proj.qweight"].dtype == torch.int32
    if method != "awq":
        assert "model.layers.0.self_attn.q_proj.g_idx" in tensors
    float_dir = _dequantized_copy(dst, tmp_path / "float")
    assert _greedy(dst, IntQuantLinear) == _greedy(float_dir, torch.nn.Linear)


def test_quantize_rejects_group_size_that_does_not_divide(tiny, tmp_path, capsys):
    assert _cli(["quantize", "--method", "rtn", "--group-size", "48", "--no-progress",
                 str(tiny), str(tmp_path / "out")]) == 2
    assert "use 64 or 32" in capsys.readouterr().out
    assert _cli(["quantize", "--method", "awq", "--act-order", "--group-size", "32",
                 "--no-progress", str(tiny), str(tmp_path / "out")]) == 2
    assert "act order is a gptq option" in capsys.readouterr().out


def _write_quantized(tiny: Path, dst: Path, pack_fn, qc: dict) -> Path:
    """Quantize the tiny model's projections with `pack_fn(name, weight) -> tensors`."""
    tensors = load_file(tiny / "model.safetensors")
    out = {}
    for name, t in tensors.items():
        module = name.removesuffix(".weight")
        if module.endswith(PROJS):
            out.update({f"{module}.{k}": v for k, v in pack_fn(module, t).items()})
        else:
            out[name] = t
    dst.mkdir()
    save_file(out, dst / "model.safetensors")
    config = json.loads((tiny / "config.json").read_text())
    config["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(config))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny / f, dst / f)
    return dst


def test_compressed_tensors_w4a16_checkpoint(tiny, tmp_path):
    def pack_fn(module, w):
        r = rtn(w.float(), 4, 32, sym=True)
        return compressed_tensors.quantized_to_checkpoint(r.q, r.scales, 4)

    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
               "group_size": 32}
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}
    dst = _write_quantized(tiny, tmp_path / "ct", pack_fn, qc)
    assert _greedy(dst, IntQuantLinear) == _greedy(_dequantized_copy(dst, tmp_path / "f"),
                                                   torch.nn.Linear)


def test_gptq_act_order_checkpoint(tiny, tmp_path):
    gen = torch.Generator().manual_seed(0)
    perms = {}  # q/k/v (and gate/up) share their inputs, so they share g_idx

    def pack_fn(module, w):
        n, k = w.shape
        shared = module.rsplit(".", 1)[0] + str(k)
        if shared not in perms:
            perms[shared] = (torch.randperm(k, generator=gen) // 32).to(torch.int32)
        g_idx = perms[shared]
        r = rtn(w.float(), 4, 32, sym=False)  # integers and scales; groups reassigned below
        return gptq.quantized_to_checkpoint(r.q, r.zeros.clamp(1, 15), r.scales, g_idx)

    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False}
    dst = _write_quantized(tiny, tmp_path / "gptq", pack_fn, qc)
    assert _greedy(dst, IntQuantLinear) == _greedy(_dequantized_copy(dst, tmp_path / "f"),
                                                   torch.nn.Linear)


def test_default_model_kept_quantized_q4_1_same_tokens(caplog):
    """Float32 weights, the kept blocks' reference path (dequantized at every step) and, where
    a C compiler builds them, the native CPU kernels: the same greedy tokens."""
    from hearth.kernels import cpu_native

    prompts = ["The capital of France is", "def fibonacci(n):"]
    outs = {}
    caplog.set_level(logging.WARNING, logger="hearth.engine.model_builder")
    configs = {"float32": dict(gguf_keep_quantized=False),
               "reference": dict(gguf_keep_quantized=True, cpu_native=False)}
    if cpu_native.available():
        configs["native"] = dict(gguf_keep_quantized=True)
    for name, extra in configs.items():
        llm = LLM(device="cpu", dtype="float32", progress=False, **extra)
        try:
            layers = [m for m in llm.engine.runner.model.modules() if isinstance(m, GGUFLinear)]
            keep = extra["gguf_keep_quantized"]
            assert len(layers) == (30 * 4 if keep else 0)  # qkv, o, gate_up, down per layer
            assert all(m.qtype == "Q4_1" for m in layers)
            assert all(m.native_rows == (name == "native") for m in layers)
            ids = [llm.tokenizer.encode(p) for p in prompts]
            params = SamplingParams(temperature=0, max_tokens=6)
            outs[name] = [o.outputs[0].token_ids for o in llm.generate(ids, params,
                                                                       use_tqdm=False)]
        finally:
            llm.shutdown()
    assert all(out == outs["float32"] for out in outs.values()), outs
    assert "dequantizes every layer at every step" in caplog.text  # the slow reference path


def test_gptq_act_order_lowers_output_error():
    """On inputs of uneven scale and correlated channels, GPTQ beats RTN at reproducing x W^T,
    and act order (static groups) beats plain GPTQ; its groups stay k // group_size."""
    from hearth.appliance.tools.quantizer.algorithms import gptq

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=gen)
    mix = torch.eye(256) + 0.3 * torch.randn(256, 256, generator=gen) / 16
    x = torch.randn(2048, 256, generator=gen) @ mix * torch.linspace(0.1, 3, 256)
    hessian = 2 * x.t() @ x / x.shape[0]
    ref = x @ w.t()

    def error(result):
        return ((x @ result.dequantize().t() - ref).pow(2).mean() / ref.pow(2).mean()).item()

    plain, ordered = gptq(w, hessian, 4, 64, True), gptq(w, hessian, 4, 64, True, act_order=True)
    assert error(ordered) < error(plain) < error(rtn(w, 4, 64, True))
    assert ordered.scales.shape == (64, 4) and int(ordered.q.max()) <= 15


def test_cpu_converts_int_layout_once(tiny, tmp_path):
    """On CPU, a quantized checkpoint is converted at load: 4 bits with plain groups in bf16 run
    torch's int4 GEMV (same next token, logprobs close to the dense bf16 weights), float32 a
    dense weight with the reference's numbers; the packed buffers are released."""
    dst = tmp_path / "gptq"
    assert _cli(["quantize", "--method", "gptq", "--group-size", "32", "--num-samples", "2",
                 "--seq-len", "32", "--no-progress", str(tiny), str(dst)]) == 0
    float_dir = _dequantized_copy(dst, tmp_path / "float")
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
    prompt = torch.randint(3, 512, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    top = {}
    for path, dtype in ((dst, "bfloat16"), (float_dir, "bfloat16"), (dst, "float32")):
        llm = LLM(str(path), device="cpu", dtype=dtype, progress=False)
        try:
            layers = [m for m in llm.engine.runner.model.modules()
                      if isinstance(m, IntQuantLinear)]
            if path == dst:
                assert len(layers) == 2 * 4 and all(m.qweight.numel() == 0 for m in layers)
                converted = [m.int4 if dtype == "bfloat16" else m.dense for m in layers]
                assert all(c is not None for c in converted)
            first = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].logprobs[0]
            top[path, dtype] = dict(zip(first.top_token_ids, first.top_logprobs))
        finally:
            llm.shutdown()
    packed, dense = top[dst, "bfloat16"], top[float_dir, "bfloat16"]
    assert max(packed, key=packed.get) == max(dense, key=dense.get)
    assert max(abs(packed[t] - dense[t]) for t in set(packed) & set(dense)) < 0.15
