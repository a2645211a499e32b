"""Errors that help: an unsupported architecture or tensor names the file, the architecture and
what Hearth supports; a model that cannot fit the device is refused before any weight is read,
with the numbers."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import save_tiny_model, write_gguf
from safetensors.torch import load_file, save_file

from hearth import LLM
from hearth.engine import model_builder
from hearth.engine.loader import load_gguf, load_hf_config
from hearth.engine.memory_check import (
    DeviceMemory,
    MemoryNeed,
    check_fits,
    host_memory,
    weight_bytes,
)
from hearth.engine.model_config import SUPPORTED_ARCHITECTURES
from hearth.engine.models.llama import LlamaForCausalLM

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def _tiny_gguf(path, arch="llama", extra_tensors=()):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=16)
    write_gguf(path, arch, transformers.LlamaForCausalLM(config), extra_tensors)
    return path


def test_unsupported_gguf_architecture_names_file_arch_and_list(tmp_path):
    path = _tiny_gguf(tmp_path / "falcon.gguf", arch="falcon")
    with pytest.raises(ValueError) as e:
        load_gguf(path)
    message = str(e.value)
    assert str(path) in message and "'falcon'" in message
    for arch in ("llama", "qwen3moe", "gemma3", "phi3"):
        assert arch in message


def test_unexpected_gguf_tensor_names_file_tensor_and_what_loads(tmp_path):
    path = _tiny_gguf(tmp_path / "odd.gguf",
                      extra_tensors=[("blk.0.mystery.weight", torch.zeros(4, 32))])
    with pytest.raises(ValueError) as e:
        load_gguf(path)
    message = str(e.value)
    assert str(path) in message and "'blk.0.mystery.weight'" in message and "'llama'" in message
    assert "blk.N.attn_q.weight" in message


def test_unsupported_hf_architecture_names_dir_arch_and_list(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"]}))
    with pytest.raises(ValueError) as e:
        load_hf_config(tmp_path)
    assert str(tmp_path) in str(e.value) and "FalconForCausalLM" in str(e.value)
    assert all(arch in str(e.value) for arch in SUPPORTED_ARCHITECTURES)


def test_unexpected_hf_tensor_names_dir_arch_and_what_loads(tiny, tmp_path):
    odd = tmp_path / "odd"
    odd.mkdir()
    for f in tiny.iterdir():
        (odd / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(odd / "model.safetensors"))
    tensors["model.layers.0.mlp.mystery.weight"] = torch.zeros(3)
    save_file(tensors, str(odd / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        LLM(str(odd), device="cpu", progress=False)
    message = str(e.value)
    assert str(odd) in message and "LlamaForCausalLM" in message
    assert "'model.layers.0.mlp.mystery.weight'" in message
    assert "model.layers.N.mlp.down_proj.weight" in message


def test_a_model_that_cannot_fit_is_refused_before_loading(tiny, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(LlamaForCausalLM, "load_weights", never)
    small = DeviceMemory("host RAM", free=300 << 20, total=1 << 30, usable=300 << 20)
    monkeypatch.setattr(model_builder, "host_memory", lambda: small)
    with pytest.raises(ValueError) as e:  # the CPU default reserves 1 GiB of KV cache
        LLM(str(tiny), device="cpu", progress=False)
    message = str(e.value)
    assert "does not fit host RAM" in message and "0.29 GiB free of 1.00 GiB" in message
    assert "KV cache" in message and "float32 weights" in message
    monkeypatch.setattr(model_builder, "host_memory", lambda: DeviceMemory("host RAM", 1 << 40,
                                                                           1 << 40, 1 << 40))
    with pytest.raises(AssertionError, match="weights were read"):  # fits: loading begins
        LLM(str(tiny), device="cpu", progress=False)


def test_check_fits_message_for_a_gpu():
    need = MemoryNeed(61 << 30, 2 << 30, "bfloat16 weights", "one 4096-token sequence")
    card = DeviceMemory("cuda:0 (NVIDIA H100 80GB HBM3)", 70 << 30, 80 << 30, 62 << 30)
    with pytest.raises(ValueError) as e:
        check_fits("qwen3-30b-a3b", need, card)
    message = str(e.value)
    assert "needs 63.00 GiB (61.00 GiB of bfloat16 weights + 2.00 GiB of KV cache" in message
    assert "70.00 GiB free of 80.00 GiB, 62.00 GiB usable" in message
    check_fits("x", MemoryNeed(1, 1, "w", "k"), card)  # fits: no error
    check_fits("x", need, None)  # unknown memory: no check


def test_weight_bytes_and_host_memory(tmp_path):
    from hearth.engine.quantization.config import QuantConfig

    config = load_hf_config(model_builder.__file__.rsplit("/engine/", 1)[0]
                            + "/bench/configs/llama-3-8b")
    assert weight_bytes(config, 2, None) == config.num_params * 2
    import dataclasses

    awq = dataclasses.replace(config, quantization=QuantConfig("awq", 4, 128))
    assert 0.3 < weight_bytes(awq, 2, None) / (config.num_params * 2) < 0.4  # head stays 16-bit
    assert weight_bytes(config, 2, 4 << 30) == (4 << 30) + config.vocab_size * 4096 * 2
    moe = load_hf_config(model_builder.__file__.rsplit("/engine/", 1)[0]
                         + "/bench/configs/qwen3-30b-a3b")
    assert 0.9 < moe.num_expert_params / moe.num_params < 0.99
    kept = weight_bytes(moe, 2, 18 << 30)  # a Q4_K_M file: its experts come as bf16
    assert moe.num_expert_params * 2 < kept < moe.num_params * 2
    (tmp_path / "meminfo").write_text("MemTotal: 1024 kB\nMemFree: 10 kB\nMemAvailable: 512 kB\n")
    memory = host_memory(tmp_path / "meminfo")
    assert (memory.free, memory.total, memory.usable) == (512 << 10, 1 << 20, 512 << 10)
    assert host_memory(tmp_path / "missing") is None
