"""Bad input raises ValueError with a message that says what to fix; nothing leaks."""

from __future__ import annotations

import pytest
import torch
from helpers import save_tiny_model

from hearth import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama")
    return LLM(str(path), device="cpu", dtype="float32", progress=False, max_model_len=128)


@pytest.mark.parametrize(
    "prompt, params, match",
    [
        ("", SamplingParams(), "prompt must not be empty"),
        ([], SamplingParams(), "prompt must not be empty"),
        ([1, 2, 99999], SamplingParams(), r"token ids must be integers in \[0, 512\)"),
        ([1] * 200, SamplingParams(), "prompt has 200 tokens.*context length is 128"),
        ([1] * 100, SamplingParams(max_tokens=50), "prompt has 100 tokens and max_tokens is 50"),
    ],
)
def test_bad_requests_raise_value_error(llm, prompt, params, match):
    with pytest.raises(ValueError, match=match):
        llm.generate([prompt], params, use_tqdm=False)
    assert llm.engine.snapshot().blocks.num_used == 0
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize(
    "kwargs, match",
    [({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"),
     ({"top_p": 0}, "top_p"), ({"top_p": 1.01}, "top_p")],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_engine_keeps_serving_after_a_bad_request(llm):
    with pytest.raises(ValueError):
        llm.generate([[1] * 100], SamplingParams(max_tokens=50), use_tqdm=False)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) >= 1


def test_unknown_model_name_lists_known_ones():
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        LLM("no-such-model", device="cpu", progress=False)


def test_missing_directory_and_corrupt_files(tmp_path):
    with pytest.raises(ValueError):
        LLM(str(tmp_path / "absent"), device="cpu", progress=False)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="bad.gguf"):
        LLM(str(bad), device="cpu", progress=False)
    path = save_tiny_model(tmp_path / "cut", "llama")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="safetensors"):
        LLM(str(path), device="cpu", progress=False)


def test_bad_engine_settings():
    with pytest.raises(ValueError, match="device"):
        LLM(device="tpu", progress=False)
    with pytest.raises(ValueError, match="block_size"):
        LLM(block_size=7, progress=False)


def test_fp8_kv_cache_needs_cuda(tmp_path):
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        LLM(device="cpu", kv_cache_dtype="fp8", progress=False)
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8, fp8_e4m3"):
        LLM(device="cpu", kv_cache_dtype="int8", progress=False)
    if not torch.cuda.is_available():  # device "auto" resolves to the CPU before weights load
        path = save_tiny_model(tmp_path / "llama", "llama")
        with pytest.raises(ValueError, match="kv_cache_dtype='fp8_e4m3' needs a CUDA GPU"):
            LLM(str(path), kv_cache_dtype="fp8_e4m3", progress=False)
