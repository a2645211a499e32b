"""The persistent prefix cache and the host-RAM tier through the engine, on the default model:
a restart finds the prompt's blocks on disk and answers exactly as a recompute does."""

from __future__ import annotations

import dataclasses
import shutil

import pytest

from hearth import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0)
SYSTEM = " ".join(f"Rule {i}: answer politely and cite source number {i * 7}." for i in range(40))


def _llm(**kw) -> LLM:
    kw.setdefault("device", "cpu")
    kw.setdefault("max_model_len", 2048)
    kw.setdefault("num_kv_blocks", 256)
    return LLM(progress=False, **kw)


def _answer(llm: LLM, prompt: str):
    out = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    return out.outputs[0].token_ids, out.num_cached_tokens


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A cold run (no hits: its answer is the recompute) that fills a cache directory."""
    cache = tmp_path_factory.mktemp("prefix-cache")
    llm = _llm(prefix_cache_dir=str(cache))
    prompt = SYSTEM + "\nQuestion: what is rule 3?"
    tokens, num_cached = _answer(llm, prompt)
    assert num_cached == 0
    num_prompt = len(llm.tokenizer.encode(prompt))
    llm.engine.shutdown()  # queued writes finish
    return cache, prompt, tokens, num_prompt


def _copy(warm, tmp_path):
    return shutil.copytree(warm[0], tmp_path / "cache")


def test_restart_loads_the_prefix_from_disk_with_identical_output(tmp_path, warm):
    _, prompt, expected, num_prompt = warm
    second = _llm(prefix_cache_dir=str(_copy(warm, tmp_path)))
    tokens, num_cached = _answer(second, prompt)
    stats = second.engine.prefix_store.stats
    assert tokens == expected
    assert num_cached == (num_prompt - 1) // 16 * 16 and num_cached > 500
    assert stats.blocks_loaded_from_disk == num_cached // 16
    second.engine.shutdown()


def test_other_block_size_finds_nothing(tmp_path, warm):
    _, prompt, expected, _ = warm
    other = _llm(prefix_cache_dir=str(_copy(warm, tmp_path)), block_size=32, num_kv_blocks=128)
    assert _answer(other, prompt) == (expected, 0)
    assert other.engine.prefix_store.stats.blocks_loaded_from_disk == 0
    other.engine.shutdown()


def test_truncated_cache_files_are_recomputed_not_loaded(tmp_path, warm):
    _, prompt, expected, _ = warm
    cache = _copy(warm, tmp_path)
    for path in cache.glob("*/*.kv"):  # every block file cut short: none may load
        path.write_bytes(path.read_bytes()[:-100])
    second = _llm(prefix_cache_dir=str(cache))
    tokens, num_cached = _answer(second, prompt)
    assert tokens == expected and num_cached == 0
    assert second.engine.prefix_store.disk.num_rejected >= 1
    second.engine.shutdown()


def test_blocks_evicted_from_the_device_come_back_from_host_ram(warm):
    _, prompt, expected, num_prompt = warm
    num_blocks = -(-num_prompt // 16) + 2  # room for one prompt at a time
    llm = _llm(num_kv_blocks=num_blocks, kv_offload_gib=0.5)
    assert _answer(llm, prompt) == (expected, 0)
    other = "A different conversation entirely. " * 60
    _answer(llm, other)  # evicts the first prompt's blocks into host RAM
    tokens, num_cached = _answer(llm, prompt)
    assert tokens == expected and num_cached > 500
    stats = llm.engine.prefix_store.stats
    assert stats.blocks_offloaded > 0 and stats.blocks_loaded_from_host > 0
    llm.engine.shutdown()


def test_server_restart_keeps_the_prefix_cache(tmp_path):
    """The real server, twice on one --prefix-cache-dir: the second answers the same prompt from
    disk (usage's cached_tokens) with the same greedy text."""
    import time

    import httpx
    from server_harness import running_server

    from hearth.appliance.settings import Settings
    from hearth.cli import engine_factory

    settings = Settings(device="cpu", no_ui=True, max_model_len=2048, kv_cache_gib=0.15,
                        prefix_cache_dir=str(tmp_path))
    body = {"model": "x", "prompt": SYSTEM + "\nQuestion: what is rule 5?", "max_tokens": 6,
            "temperature": 0}

    def ask(running):
        served = httpx.get(running.base_url + "/models").json()["data"][0]["id"]
        reply = httpx.post(running.base_url + "/completions", json=body | {"model": served},
                           timeout=600).json()
        return reply["choices"][0]["text"], reply["usage"]["prompt_tokens_details"]["cached_tokens"]

    with running_server(settings, engine_factory(settings)) as running:
        first_text, first_cached = ask(running)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("*/*.kv")) and time.monotonic() < deadline:
        time.sleep(0.2)
    with running_server(settings, engine_factory(settings)) as running:
        second_text, second_cached = ask(running)
    assert first_cached == 0 and second_cached > 500
    assert second_text == first_text

    # Corrupt files (a flipped payload byte in each, and a stray file) and then an unusable
    # directory: the server still starts, logs it and answers the same, never loading garbage.
    for path in tmp_path.glob("*/*.kv"):
        data = bytearray(path.read_bytes())
        data[-10] ^= 0xFF
        path.write_bytes(bytes(data))
    next(tmp_path.glob("*/")).joinpath("ab" * 16 + ".kv").write_bytes(b"not a block")
    with running_server(settings, engine_factory(settings)) as running:
        third_text, third_cached = ask(running)
    assert third_text == first_text and third_cached == 0
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    unusable = dataclasses.replace(settings, prefix_cache_dir=str(blocker))
    with running_server(unusable, engine_factory(unusable)) as running:
        fourth_text, _ = ask(running)
    assert fourth_text == first_text


@pytest.mark.gpu
def test_restart_on_cuda_stages_disk_hits_on_the_device(tmp_path, monkeypatch):
    """CUDA: disk hits are read into the two pinned chunk buffers in turn (3 blocks a chunk
    here, so the double buffering runs) and staged on the device; the restarted engine answers
    as the cold one did, from a tiny model the test builds."""
    import torch
    from helpers import save_tiny_model

    from hearth.engine.kv_tiers import prefix_store

    path = save_tiny_model(tmp_path / "llama", "llama")
    prompt = torch.randint(3, 512, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    kw = dict(device="cuda", dtype="float32", prefix_cache_dir=str(tmp_path / "cache"),
              block_size=16, progress=False, kv_cache_gib=0.25)
    cold = LLM(str(path), **kw)
    expected = cold.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert expected.num_cached_tokens == 0
    cold.shutdown()
    del cold
    torch.cuda.empty_cache()
    block_nbytes = 2 * 2 * 16 * 2 * 16 * 4  # layers, K and V, tokens, KV heads, head_dim, fp32
    monkeypatch.setattr(prefix_store, "_CHUNK_BYTES", 3 * block_nbytes)
    warm = LLM(str(path), **kw)
    assert warm.engine.prefix_store._chunks[0][0].shape == (3, block_nbytes)
    out = warm.generate([prompt], GREEDY, use_tqdm=False)[0]
    stats = warm.engine.prefix_store.stats
    assert out.outputs[0].token_ids == expected.outputs[0].token_ids
    assert out.num_cached_tokens == 399 and stats.blocks_loaded_from_disk == 25
    assert stats.disk_read_s > 0
    warm.shutdown()
