"""`--dtype auto` on a CPU (engine/cpu_precision.py): bfloat16 with kept Q4 blocks where the CPU
runs torch's int4 GEMV vectorised (AVX2 + FMA, AVX-512, or bf16 matrix instructions) and the
GGUF's linears are Q4_0/Q4_1, float32 otherwise; and the fast path's quality: held-out perplexity
within 1% of the exact float32 path (on whatever CPU the test runs: CI's has AVX2 only, so its
prompts multiply in float32)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hearth.appliance.settings import Settings
from hearth.engine import cpu_precision
from hearth.engine.catalog import resolve_model
from hearth.engine.config import EngineConfig
from hearth.engine.cpu_precision import gguf_linear_types, resolve_cpu_precision

DATA = Path(__file__).parent / "data" / "gguf"


def _cpu_with(monkeypatch, *flags: str) -> None:
    monkeypatch.setattr(cpu_precision, "cpu_flags", lambda: frozenset(flags))


@pytest.fixture
def bf16_cpu(monkeypatch):
    _cpu_with(monkeypatch, "avx2", "fma", "avx512f", "avx512_bf16")


def _resolve(config: EngineConfig, path: Path, device: str = "cpu") -> EngineConfig:
    return resolve_cpu_precision(config, "gguf", path, device)


def test_the_server_asks_for_the_fast_path_and_the_engine_does_not():
    assert Settings().engine.cpu_fast_path is True
    assert EngineConfig().cpu_fast_path is False


def test_default_model_on_a_bf16_cpu_gets_bf16_and_kept_blocks(bf16_cpu):
    path = resolve_model(None).path
    assert gguf_linear_types(path) == {"Q4_1"}
    fast = _resolve(EngineConfig(cpu_fast_path=True), path)
    assert (fast.dtype, fast.gguf_keep_quantized) == ("bfloat16", True)


@pytest.mark.parametrize("config", [
    EngineConfig(),  # the engine's own default: exact
    EngineConfig(cpu_fast_path=True, dtype="float32"),  # asked for exactly
    EngineConfig(cpu_fast_path=True, load_format="dummy"),
])
def test_exact_unless_auto_and_asked(bf16_cpu, config):
    assert _resolve(config, resolve_model(None).path) == config


def test_cuda_and_hf_directories_are_left_alone(bf16_cpu):
    config = EngineConfig(cpu_fast_path=True)
    assert _resolve(config, resolve_model(None).path, "cuda") == config
    assert resolve_cpu_precision(config, "hf", "/some/dir", "cpu") == config


@pytest.mark.parametrize("flags,want", [
    (("avx2", "fma"), ("float32", True, True)),  # bf16 GEMVs in a float32 model
    (("avx512f",), ("float32", True, True)),
    (("amx_bf16",), ("bfloat16", True, False)),
    (("avx2", "fma", "avx512_bf16"), ("bfloat16", True, False)),
])
def test_avx2_or_better_gets_the_int4_gemv(monkeypatch, flags, want):
    """Without bf16 matrix instructions the int4 GEMV still pays (AVX2 EPYC: decode ~1.8x), on
    bf16 inputs inside an otherwise float32 model."""
    _cpu_with(monkeypatch, *flags)
    fast = _resolve(EngineConfig(cpu_fast_path=True), resolve_model(None).path)
    assert (fast.dtype, fast.gguf_keep_quantized, fast.cpu_bf16_gemv) == want


@pytest.mark.parametrize("flags", [(), ("sse4_2", "avx"), ("avx2",)])  # or a non-x86 cpuinfo
def test_a_cpu_without_a_vectorised_int4_gemv_keeps_float32(monkeypatch, flags):
    _cpu_with(monkeypatch, *flags)
    config = EngineConfig(cpu_fast_path=True)
    assert _resolve(config, resolve_model(None).path) == config


@pytest.mark.parametrize("name", ["llama-Q4_K_M.gguf", "llama-Q8_0.gguf", "llama-F16.gguf"])
def test_block_types_without_an_int4_gemv_keep_float32(bf16_cpu, name):
    config = EngineConfig(cpu_fast_path=True)
    assert _resolve(config, DATA / name) == config


def test_fast_path_perplexity_within_one_percent_of_float32():
    """Every logit of the fast path comes from the int8 LM head, one row per call as at batch-1
    decode (engine/quantization/cpu_int8.py), and the 16-bit head at full width as prefill."""
    from hearth.appliance.tools.quantizer.calibration import perplexity, split_text
    from hearth.engine.llm_engine import LLMEngine

    results = {}
    for name, dtype, keep, gemv in (("float32", "float32", False, False),
                                    ("bfloat16", "bfloat16", True, False),
                                    ("float32, bf16 GEMVs", "float32", True, True)):
        engine = LLMEngine(EngineConfig(device="cpu", dtype=dtype, gguf_keep_quantized=keep,
                                        cpu_bf16_gemv=gemv, kv_cache_gib=0.05,
                                        max_model_len=1024), progress=False)
        try:
            ids = engine.tokenizer.encode(split_text()[1], add_special_tokens=False)[:600]
            model = engine.runner.model
            assert (model.lm_head_int8 is not None) == keep  # the file's head is Q8_0
            results[name] = perplexity(model, ids, logit_rows=1)
            if name == "bfloat16":
                results["bfloat16, 16-bit head"] = perplexity(model, ids)
        finally:
            engine.shutdown()
    for fast in ("bfloat16", "bfloat16, 16-bit head", "float32, bf16 GEMVs"):
        assert abs(results[fast] / results["float32"] - 1) < 0.01, results
