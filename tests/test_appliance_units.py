"""Unit tests of the appliance's pure parts: settings (flags, HEARTH_* variables), the CLI,
streaming deltas, the Host/API-key checks. No server, no model: milliseconds."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from hearth import cli
from hearth.appliance.deltas import DeltaTracker, RequestDelta, SampleDelta, merge_deltas
from hearth.appliance.protocol import APIError
from hearth.appliance.request_stream import RequestStream
from hearth.appliance.security import allowed_host_names, check_api_key, host_of
from hearth.appliance.settings import Settings, add_arguments, settings_from
from hearth.appliance.telemetry import NO_GPU, GpuSampler, HostSampler
from hearth.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob


def _settings(argv: list[str], env: dict[str, str]) -> Settings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return settings_from(parser.parse_args(argv), env)


def test_defaults_are_local_and_closed():
    settings = _settings([], {})
    assert settings == Settings()
    assert settings.host == "127.0.0.1" and settings.api_key is None
    assert settings.allowed_origins == () and settings.allowed_hosts == ()


def test_flag_beats_environment_beats_default():
    env = {
        "HEARTH_PORT": "9000",
        "HEARTH_MAX_NUM_SEQS": "8",
        "HEARTH_NO_UI": "true",
        "HEARTH_ALLOWED_ORIGINS": "http://a.example, http://b.example",
        "HEARTH_API_KEY": "from-env",
        "HEARTH_KV_CACHE_GIB": "2.5",
        "HEARTH_KV_CACHE_DTYPE": "fp8",
    }
    settings = _settings(["--port", "9100", "--served-model-name", "x", "y",
                          "--gguf-keep-quantized"], env)
    assert settings.port == 9100 and settings.max_num_seqs == 8 and settings.no_ui
    assert settings.allowed_origins == ("http://a.example", "http://b.example")
    assert settings.served_model_name == ("x", "y") and settings.api_key == "from-env"
    assert settings.kv_cache_gib == 2.5
    assert settings.engine.kv_cache_dtype == "fp8"
    assert settings.engine.max_num_seqs == 8
    assert settings.engine.gguf_keep_quantized


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"HEARTH_PORT": "http"}, "HEARTH_PORT: must be an integer"),
        ({"HEARTH_NO_UI": "maybe"}, "HEARTH_NO_UI: must be true or false"),
        ({"HEARTH_DEVICE": "tpu"}, "HEARTH_DEVICE: must be one of auto, cpu, cuda"),
        ({"HEARTH_KV_CACHE_DTYPE": "int8"}, "HEARTH_KV_CACHE_DTYPE: must be one of auto, fp8"),
        ({"HEARTH_MAX_MODEL_LEN": "0"}, "HEARTH_MAX_MODEL_LEN: must be >= 1"),
        ({"HEARTH_PORT": "70000"}, "port must be in [0, 65535]"),
        ({"HEARTH_API_KEY": ""}, "api_key must not be empty"),
    ],
)
def test_bad_environment_values_name_the_variable(env, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[")):
        _settings([], env)


def test_help_documents_every_flag_and_variable(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in (
        "MODEL",
        "HOST",
        "PORT",
        "API_KEY",
        "MAX_MODEL_LEN",
        "MAX_NUM_SEQS",
        "KV_CACHE_GIB",
        "KV_CACHE_DTYPE",
        "GPU_MEMORY_UTILIZATION",
        "DEVICE",
        "SERVED_MODEL_NAME",
        "MAX_QUEUED_REQUESTS",
        "ALLOWED_ORIGINS",
        "ALLOWED_HOSTS",
        "NO_UI",
    ):
        assert f"HEARTH_{name}" in text
        assert "--" + name.lower().replace("_", "-") in text
    assert cli.main([]) == 2
    assert "serve" in capsys.readouterr().out


def test_bad_flag_exits_with_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--gpu-memory-utilization", "-1"])
    assert exit_info.value.code == 2
    assert "gpu-memory-utilization" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "env", "value"),
    [
        ([], {}, "auto"),
        (["--engine-process"], {}, "on"),  # the flag alone, as before it took a value
        (["--engine-process", "off"], {"HEARTH_ENGINE_PROCESS": "on"}, "off"),
        (["--engine-process", "--port", "9000"], {}, "on"),
        ([], {"HEARTH_ENGINE_PROCESS": "1"}, "on"),
        ([], {"HEARTH_ENGINE_PROCESS": "false"}, "off"),
        ([], {"HEARTH_ENGINE_PROCESS": "AUTO"}, "auto"),
    ],
)
def test_engine_process_is_auto_on_or_off(argv, env, value):
    assert _settings(argv, env).engine_process == value
    assert Settings(engine_process=value == "on").engine_process in ("on", "off")  # bools too


def test_engine_process_auto_means_a_cuda_device(monkeypatch):
    from hearth.appliance import engine_process

    def wanted(setting: str, device: str) -> bool:  # with the GPUs NVML sees, as the server
        return engine_process.wanted(setting, device, GpuSampler().num_gpus)

    assert wanted("on", "cpu") and not wanted("off", "cuda")
    assert wanted("auto", "cuda") and wanted("auto", "cuda:1") and not wanted("auto", "cpu")
    # --device auto, decided without importing torch, agrees with torch where it can tell
    import torch

    if torch.version.cuda is None:  # a CPU build (CI's): never the engine process
        assert not wanted("auto", "auto")
    elif torch.cuda.is_available():
        assert wanted("auto", "auto")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not wanted("auto", "auto")
    with pytest.raises(ValueError, match="engine_process must be one of auto, on, off"):
        Settings(engine_process="sometimes")
    with pytest.raises(SystemExit):
        _settings(["--engine-process", "sometimes"], {})


def _output(text: str, ids: list[int], finished: bool = False, logprobs=None) -> RequestOutput:
    reason = "stop" if finished else None
    return RequestOutput(
        "r", None, [5, 6], [CompletionOutput(0, text, ids, reason, logprobs)], finished
    )


def test_delta_tracker_sends_only_what_is_new():
    tracker = DeltaTracker()
    tracker.start("r", n=1)
    lp = [TokenLogprob(7, -0.1), TokenLogprob(8, -0.2), TokenLogprob(9, -0.3)]
    [first] = tracker.update([_output("Hel", [7], logprobs=lp[:1])], now=1.0)
    assert (first.samples[0].text, first.samples[0].token_ids) == ("Hel", [7])
    assert first.prompt_token_ids == [5, 6] and not first.finished
    # A token whose text is held back is still delivered (its id and logprob count).
    [held] = tracker.update([_output("Hel", [7, 8], logprobs=lp[:2])], now=2.0)
    assert (held.samples[0].text, held.samples[0].token_ids) == ("", [8])
    [last] = tracker.update([_output("Hello", [7, 8, 9], True, lp)], now=3.0)
    assert last.samples[0].text == "lo" and last.samples[0].logprobs == lp[2:]
    assert last.finished and last.samples[0].finish_reason == "stop"
    assert tracker.update([_output("Hello", [7, 8, 9], True)], now=4.0) == []  # forgotten


def test_delta_tracker_abort_ends_unfinished_samples():
    tracker = DeltaTracker()
    tracker.start("r", n=2)
    tracker.update([_output("a", [1])], now=1.0)
    final = tracker.abort("r", now=2.0)
    assert final.finished and [(s.index, s.finish_reason) for s in final.samples] == [
        (0, "abort"),
        (1, "abort"),
    ]
    assert tracker.abort("r", now=3.0) is None


def _delta(*samples: SampleDelta, finished: bool = False, time: float = 0.0) -> RequestDelta:
    return RequestDelta("r", list(samples), [5, 6], finished, 0, time)


def test_merge_deltas_joins_what_each_sample_gained():
    lp = [TokenLogprob(7, -0.1), TokenLogprob(8, -0.2), TokenLogprob(9, -0.3)]
    first = _delta(SampleDelta(0, "Hel", [7], lp[:1]), SampleDelta(1, "a", [3]), time=1.0)
    then = _delta(SampleDelta(0, "lo", [8, 9], lp[1:], "stop", "!"), SampleDelta(2, "b", [4]),
                  finished=True, time=2.0)
    merged = merge_deltas(first, then)
    assert [(s.index, s.text, s.token_ids) for s in merged.samples] == [
        (0, "Hello", [7, 8, 9]), (1, "a", [3]), (2, "b", [4])]
    zero = merged.samples[0]
    assert zero.logprobs == lp and (zero.finish_reason, zero.stop_reason) == ("stop", "!")
    assert merged.finished and merged.time == 2.0 and merged.prompt_token_ids == [5, 6]


def test_a_stream_behind_takes_its_queued_deltas_as_one_and_errors_stay_queued():
    async def consume() -> list:
        stream = RequestStream("r", abort=lambda: None)
        for i, text in enumerate("abc"):
            stream.put(_delta(SampleDelta(0, text, [ord(text)]), time=float(i)))
        got = [await stream.__anext__()]
        stream.put(_delta(SampleDelta(0, "d", [100])))
        stream.put(RuntimeError("engine died"))
        got.append(await stream.__anext__())
        try:
            await stream.__anext__()
        except RuntimeError as error:
            got.append(str(error))
        return got

    abc, d, error = asyncio.run(consume())
    assert (abc.samples[0].text, abc.samples[0].token_ids, abc.time) == ("abc", [97, 98, 99], 2.0)
    assert d.samples[0].text == "d" and error == "engine died"


def test_host_names():
    assert host_of("Example.COM:8000") == "example.com"
    assert host_of("[::1]:8000") == "::1" and host_of("::1") == "::1"
    names = allowed_host_names("127.0.0.1", ["my-box.lan"])
    assert {"localhost", "127.0.0.1", "::1", "my-box.lan"} <= names
    assert allowed_host_names("127.0.0.1", ["*"]) is None
    assert "127.0.0.1" in allowed_host_names("0.0.0.0", [])  # this machine's addresses


def test_api_key_check():
    check_api_key(None, None)  # no key configured: open
    check_api_key("Bearer s3cret", "s3cret")
    check_api_key("bearer s3cret", "s3cret")
    for header in (None, "", "s3cret", "Bearer", "Bearer s3cre", "Basic s3cret", "Bearer s3cretX"):
        with pytest.raises(APIError) as error:
            check_api_key(header, "s3cret")
        assert error.value.status == 401


def test_samplers_without_a_gpu_report_and_do_not_crash():
    gpu = GpuSampler()
    if gpu.status == NO_GPU:  # this machine (CI, the 2-core box): NVML absent
        assert gpu.sample() == []
    else:
        assert all(0 <= s.utilization <= 1 and s.memory_total_bytes > 0 for s in gpu.sample())
    gpu.close()
    host = HostSampler().sample()
    assert 0 <= host.cpu_utilization <= 1
    assert 0 < host.process_rss_bytes < host.memory_total_bytes
    assert 0 < host.memory_used_bytes <= host.memory_total_bytes


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize(("text", "reason", "stop"), [
    ("Hello", None, None), ('a "quoted"\\ line\n\ttab', "stop", "\n"),
    ("naïve 日本 🙂\u2028", "length", None), ("", "stop", 2), ("\x00\x1f control", None, None)])
def test_a_text_chunk_is_the_same_bytes_as_the_dict_path(include_usage, text, reason, stop):
    from hearth.appliance.serving.core import ChunkWriter

    writer = ChunkWriter('cmpl-"x"', "text_completion", "mödel", include_usage, created=123)
    choice = {"index": 3, "text": text, "logprobs": None, "finish_reason": reason,
              "stop_reason": stop}
    assert writer.text_choice(3, text, reason, stop) == writer([choice])
