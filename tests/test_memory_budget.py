"""A memory budget that sizes itself (issue 20, item 6): `--max-model-len auto` picks the longest
context whose KV cache holds max_num_seqs sequences of average length, logs the choice, refuses
with the numbers when nothing useful fits, and `hearth doctor`'s context line says all of it
before a start."""

from __future__ import annotations

import argparse
import logging

import pytest
from helpers import save_tiny_model

from hearth import LLM
from hearth.appliance.settings import Settings, add_arguments, settings_from
from hearth.appliance.tools.context_check import KvBudget, judge
from hearth.engine.config import EngineConfig
from hearth.engine.loader import load_hf_config
from hearth.engine.memory_check import MIN_AUTO_LEN, DeviceMemory, choose_max_model_len

GIB = 1 << 30
SMOLLM2_F32_PER_TOKEN = 2 * 30 * 3 * 64 * 4  # layers, KV heads, head_dim, float32


def test_auto_picks_the_longest_context_for_max_num_seqs_of_average_length():
    choice = choose_max_model_len(GIB, SMOLLM2_F32_PER_TOKEN, 64, 16, 8192, "kv_cache_gib=1")
    assert choice.kv_tokens == 23296  # 1 GiB / 46,080 bytes, whole blocks
    assert choice.max_model_len == 720  # 64 sequences of 360 tokens on average: 23,040 tokens
    assert choice.max_model_len * 64 // 2 <= choice.kv_tokens
    assert (choice.max_model_len + 16) * 64 // 2 > choice.kv_tokens  # the longest such
    text = choice.describe()
    assert "720 tokens" in text and "64 sequences" in text and "kv_cache_gib=1" in text
    one = choose_max_model_len(GIB, SMOLLM2_F32_PER_TOKEN, 1, 16, 8192, "b")
    assert one.max_model_len == 8192 and "model's own maximum" in one.describe()
    two = choose_max_model_len(GIB, SMOLLM2_F32_PER_TOKEN, 2, 16, 1 << 20, "b")
    assert two.max_model_len == 23296  # never longer than the cache holds alone


def test_auto_refuses_a_budget_too_small_with_the_numbers():
    with pytest.raises(ValueError) as error:
        choose_max_model_len(64 << 20, SMOLLM2_F32_PER_TOKEN, 64, 16, 8192, "kv_cache_gib=0.0625")
    message = str(error.value)
    assert "1456 tokens" in message and "64 sequences" in message
    assert str(MIN_AUTO_LEN) in message and "--max-num-seqs" in message


def test_auto_in_config_and_settings():
    assert EngineConfig(max_model_len="auto").max_model_len == "auto"
    with pytest.raises(ValueError, match="num_kv_blocks"):
        EngineConfig(max_model_len="auto", num_kv_blocks=10)
    with pytest.raises(ValueError, match="or 'auto'"):
        EngineConfig(max_model_len="long")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert settings_from(parser.parse_args(["--max-model-len", "auto"]), {}).max_model_len == "auto"
    env = settings_from(parser.parse_args([]), {"HEARTH_MAX_MODEL_LEN": "AUTO"})
    assert env.engine.max_model_len == "auto"
    assert settings_from(parser.parse_args(["--max-model-len", "512"]), {}).max_model_len == 512
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-model-len", "lots"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def test_an_engine_with_auto_uses_and_logs_the_choice(tiny, caplog):
    per_token = load_hf_config(tiny).kv_bytes_per_token(4)
    budget_gib = 4000 * per_token / GIB
    expected = choose_max_model_len(int(budget_gib * GIB), per_token, 4, 16,
                                    load_hf_config(tiny).max_position_embeddings, "x")
    with caplog.at_level(logging.WARNING, logger="hearth.engine.model_builder"):
        llm = LLM(str(tiny), device="cpu", max_model_len="auto", kv_cache_gib=budget_gib,
                  max_num_seqs=4, progress=False)
    assert llm.engine.max_model_len == expected.max_model_len < 4000
    assert llm.engine.model_info.max_model_len == expected.max_model_len
    assert f"max_model_len auto: {expected.max_model_len} tokens" in caplog.text
    out = llm.generate(["hello"])[0]
    assert out.outputs[0].token_ids  # it serves


def test_an_engine_with_auto_and_no_room_is_refused_at_startup(tiny):
    per_token = load_hf_config(tiny).kv_bytes_per_token(4)
    with pytest.raises(ValueError) as error:
        LLM(str(tiny), device="cpu", max_model_len="auto", kv_cache_gib=300 * per_token / GIB,
            max_num_seqs=64, progress=False)
    assert "max_model_len auto" in str(error.value) and "64 sequences" in str(error.value)


def _judge(max_model_len, budget_bytes, memory=None, weights=GIB, max_num_seqs=64):
    settings = Settings(max_model_len=max_model_len, max_num_seqs=max_num_seqs)
    budget = KvBudget(budget_bytes, "kv_cache_gib", SMOLLM2_F32_PER_TOKEN)
    return judge(settings, "smollm2", 8192, weights, budget, memory)


def test_doctor_context_line():
    auto = _judge("auto", GIB)
    assert auto.status == "OK" and "max_model_len auto: 720 tokens" in auto.detail
    fixed = _judge(None, GIB)
    assert fixed.status == "OK" and "8192: " in fixed.detail and "2 full-length" in fixed.detail
    assert "auto would pick 720" in fixed.detail
    too_long = _judge(None, 100 << 20)
    assert too_long.status == "FAIL" and "fewer than one sequence" in too_long.detail
    assert _judge("auto", 32 << 20).status == "FAIL"
    card = DeviceMemory("cuda:0 (test card)", free=2 * GIB, total=8 * GIB, usable=2 * GIB)
    no_fit = _judge(None, GIB, memory=card, weights=3 * GIB)
    assert no_fit.status == "FAIL" and "does not fit cuda:0 (test card)" in no_fit.detail


@pytest.mark.gpu
def test_auto_on_the_gpu_sizes_the_context_from_what_the_card_leaves(tmp_path):
    """On CUDA without kv_cache_gib: the budget is what gpu_memory_utilization leaves after the
    weights and the profiling pass; the choice holds max_num_seqs sequences of average length."""
    path = save_tiny_model(tmp_path / "llama", "llama", max_position_embeddings=1 << 20)
    llm = LLM(str(path), device="cuda", max_model_len="auto", max_num_seqs=4096,
              gpu_memory_utilization=0.3, enforce_eager=True, progress=False)
    length = llm.engine.max_model_len
    blocks = llm.engine.runner.num_blocks
    assert MIN_AUTO_LEN <= length < 1 << 20 and length % 16 == 0
    assert 4096 * length // 2 <= blocks * 16 < 4096 * (length + 16) // 2 + 16
    assert llm.generate(["hello"])[0].outputs[0].token_ids
