"""Speculative decoding at the edges: `hearth serve` flags and variables, vLLM's spec-decode
metric names on /metrics, the monitor's acceptance line (no engine: snapshots made by hand)."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

from hearth.appliance.settings import add_arguments, settings_from
from hearth.appliance.telemetry import Telemetry
from hearth.engine.speculative import SpecDecodeStats, SpeculativeConfig
from hearth.ui.panels import speculation_summary


def _settings(argv: list[str], env: dict[str, str]):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return settings_from(parser.parse_args(argv), env)


def test_speculative_flags_build_the_engine_config():
    settings = _settings(["--speculative", "draft", "--draft-model", "tiny-draft",
                          "--num-speculative-tokens", "6"],
                         {"HEARTH_SPECULATIVE_DISABLE_BY_BATCH_SIZE": "16"})
    assert settings.engine.speculative == SpeculativeConfig(
        method="draft", num_speculative_tokens=6, draft_model="tiny-draft",
        disable_by_batch_size=16)
    assert _settings([], {"HEARTH_SPECULATIVE": "ngram"}).engine.speculative.method == "ngram"
    assert _settings([], {}).engine.speculative is None


def test_load_format_dummy_flag_reaches_the_engine_config():
    assert _settings(["--load-format", "dummy"], {}).engine.load_format == "dummy"
    assert _settings([], {"HEARTH_LOAD_FORMAT": "dummy"}).engine.load_format == "dummy"


@pytest.mark.parametrize(("argv", "words"), [
    (["--draft-model", "x"], "--draft-model is used by --speculative draft"),
    (["--speculative", "draft"], "needs a draft model"),
    (["--speculative", "ngram", "--num-speculative-tokens", "40"], "must be <= 16"),
])
def test_bad_speculative_flags_say_what_to_do(argv, words):
    with pytest.raises(ValueError, match=words):
        _settings(argv, {})


def test_bad_speculative_method_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        _settings(["--speculative", "medusa"], {})
    assert "must be one of ngram, draft" in capsys.readouterr().err


STATS = SpecDecodeStats("ngram", 3, num_drafts=10, num_draft_tokens=30, num_accepted_tokens=18,
                        accepted_per_pos=(9, 6, 3))


def _snapshot(spec):
    blocks = SimpleNamespace(usage=0.0, prefix_queries_tokens=0, prefix_hits_tokens=0,
                             num_blocks=4, num_used=0, num_free=4, num_cached=0)
    scheduler = SimpleNamespace(num_running=0, num_waiting=0, num_preemptions=0, blocks=blocks)
    return SimpleNamespace(scheduler=scheduler, blocks=blocks, num_prompt_tokens_total=0,
                           num_generation_tokens_total=0, spec_decode=spec,
                           replicas=())


def test_metrics_use_vllm_spec_decode_names():
    telemetry = Telemetry(lambda: _snapshot(STATS), dict)
    telemetry.model_name = "m"
    text = telemetry.render().decode()
    telemetry.close()
    for line in ('vllm:spec_decode_num_drafts_total{model_name="m"} 10.0',
                 'vllm:spec_decode_num_draft_tokens_total{model_name="m"} 30.0',
                 'vllm:spec_decode_num_accepted_tokens_total{model_name="m"} 18.0',
                 'vllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="0"}'
                 ' 9.0',
                 'vllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="2"}'
                 ' 3.0'):
        assert line in text, line
    off = Telemetry(lambda: _snapshot(None), dict)
    assert "spec_decode" not in off.render().decode()
    off.close()


def test_monitor_shows_the_acceptance_rate():
    line = speculation_summary(STATS)
    assert "acceptance 60% (18 / 30 tokens)" in line and "2.80 tokens a step" in line
    assert "by position 90% / 60% / 30%" in line
    assert speculation_summary(None) == ""
    assert "no proposals" in speculation_summary(SpecDecodeStats("draft", 4))
    assert STATS.acceptance_rate == 0.6 and SpecDecodeStats("ngram", 2).acceptance_rate is None


def test_served_dummy_weights_with_speculation(tmp_path):
    """`hearth serve --load-format dummy --speculative ngram` on a config-only directory: random
    weights, requests answered, spec-decode counters on /metrics."""
    import httpx
    from helpers import save_tiny_model
    from server_harness import metric, running_server

    from hearth.appliance.settings import Settings
    from hearth.cli import engine_factory

    model = save_tiny_model(tmp_path / "tiny", "llama")
    for weights in model.glob("*.safetensors"):
        weights.unlink()  # only config.json and the tokenizer remain
    settings = Settings(model=str(model), device="cpu", load_format="dummy", no_ui=True,
                        speculative="ngram", num_speculative_tokens=3)
    with running_server(settings, engine_factory(settings)) as server:
        name = httpx.get(server.base_url + "/models", timeout=30).json()["data"][0]["id"]
        reply = httpx.post(server.base_url + "/completions", timeout=120, json={
            "model": name, "prompt": "abc abc abc abc abc", "max_tokens": 12, "temperature": 0})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 12
        text = httpx.get(server.url + "metrics", timeout=30).text
        assert metric(text, "vllm:spec_decode_num_draft_tokens_total") >= 0
        assert "vllm:spec_decode_num_accepted_tokens_per_pos_total" in text
