"""`--device cuda:N` everywhere, without a GPU: config and flag checks, the device the builder
resolves (torch.cuda mocked), NVML indices through CUDA_VISIBLE_DEVICES, and the monitor's GPU
panel marking the engine's card."""

from __future__ import annotations

import pytest
import torch

from hearth.appliance.settings import Settings
from hearth.appliance.telemetry import GpuSample, engine_gpu_indices
from hearth.engine.config import EngineConfig
from hearth.engine.model_builder import resolve_device
from hearth.ui.panels import gpu_panel


def test_config_and_settings_take_cuda_n():
    assert EngineConfig(device="cuda:1").device == "cuda:1"
    assert Settings(device="cuda:1", tensor_parallel_size=2).engine.tensor_parallel_size == 2
    for bad in ("cuda:x", "cuda:01", "gpu", "cuda:"):
        with pytest.raises(ValueError, match="cuda:N"):
            EngineConfig(device=bad)
    with pytest.raises(ValueError, match="tensor_parallel_devices must name 2 devices"):
        EngineConfig(tensor_parallel_size=2, tensor_parallel_devices=("cpu",))


def test_resolve_device_checks_the_card_exists(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="only 1 GPU"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU is available"):
        resolve_device("cuda:1")


def test_engine_gpu_indices_follow_cuda_visible_devices():
    assert engine_gpu_indices("cpu") == []
    assert engine_gpu_indices("cuda") == [0]
    assert engine_gpu_indices("cuda:1") == [1]
    assert engine_gpu_indices("cuda:0, cuda:1", visible="2,3") == [2, 3]
    assert engine_gpu_indices("cuda:0", visible="GPU-5d1f") == []  # UUIDs: not mapped


def _sample(index: int) -> GpuSample:
    return GpuSample(index, "NVIDIA H100", 0.5, 1 << 30, 80 << 30, 40.0, 100.0)


def test_gpu_panel_puts_the_engines_card_first_and_marks_it():
    page = gpu_panel([_sample(0), _sample(1)], "2 NVIDIA GPU(s)", engine_gpus=[1])
    assert 'data-engine-gpus="1"' in page
    assert page.index("GPU 1: NVIDIA H100 · engine") < page.index("GPU 0: NVIDIA H100")
    assert "GPU 0: NVIDIA H100 · engine" not in page
