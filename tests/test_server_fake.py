"""The HTTP layer over a fake engine (tests/fake_engine.py): routes, formats, auth, Host/Origin
checks, backpressure and disconnect-abort, exactly and fast. The same behaviours against the real
model are in test_api_real.py."""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from fake_engine import PHRASE, FakeEngine
from server_harness import metric, running_server

from hearth.appliance.settings import Settings

KEY = "sk-test-key"
GOOD_ORIGIN = "http://good.example:3000"


@pytest.fixture(scope="module", params=[False, True], ids=["engine-thread", "engine-process"])
def server(request):
    """Every test runs against both: the engine on a thread, and in a process of its own
    (`--engine-process`, appliance/engine_process.py)."""
    settings = Settings(
        api_key=KEY,
        max_num_seqs=2,
        max_queued_requests=2,
        allowed_origins=(GOOD_ORIGIN,),
        no_ui=True,
        engine_process=request.param,
    )
    with running_server(settings, functools.partial(FakeEngine, max_num_seqs=2)) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(
        base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {KEY}"}
    ) as client:
        yield client


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)


def _sse(lines) -> list:
    events = []
    for line in lines:
        if line.startswith("data: "):
            payload = line.removeprefix("data: ")
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def _wait(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_health_version_models(server, http):
    assert httpx.get(server.url + "health").json() == {"status": "ok"}
    assert "version" in httpx.get(server.url + "version").json()
    models = http.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["fake-model"]
    assert models["data"][0]["max_model_len"] == 256


def test_completion_greedy_and_usage(client):
    out = client.completions.create(model="fake-model", prompt="abc", max_tokens=7, temperature=0)
    expected_start = (ord("a") + ord("b") + ord("c") + 1) % len(PHRASE)  # + BOS
    assert out.choices[0].text == (PHRASE * 2)[expected_start : expected_start + 7]
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (4, 7)
    assert out.usage.total_tokens == 11


def test_completion_many_prompts_and_n(client):
    out = client.completions.create(
        model="fake-model", prompt=["a", "bb", "xy"], n=2, max_tokens=3, temperature=0
    )
    assert [c.index for c in sorted(out.choices, key=lambda c: c.index)] == list(range(6))
    by_index = {c.index: c.text for c in out.choices}
    assert by_index[0] == by_index[1] and by_index[2] == by_index[3]  # greedy samples agree
    assert out.usage.prompt_tokens == 2 + 3 + 3
    assert out.usage.completion_tokens == 18
    ids = client.completions.create(model="fake-model", prompt=[[120, 121], [122]], max_tokens=2)
    assert len(ids.choices) == 2 and ids.usage.prompt_tokens == 3


def test_echo_stop_and_logprobs(client):
    out = client.completions.create(
        model="fake-model", prompt="q", max_tokens=5, echo=True, temperature=0
    )
    assert out.choices[0].text.startswith("q") and len(out.choices[0].text) == 6
    text = (
        client.completions.create(model="fake-model", prompt=[1], max_tokens=40, temperature=0)
        .choices[0]
        .text
    )
    stop_word = text[5:8]
    stopped = client.completions.create(
        model="fake-model", prompt=[1], max_tokens=40, temperature=0, stop=[stop_word]
    )
    assert stopped.choices[0].text == text[: text.index(stop_word)]
    assert stopped.choices[0].finish_reason == "stop"
    lp = (
        client.completions.create(
            model="fake-model", prompt="x", max_tokens=3, logprobs=2, temperature=0
        )
        .choices[0]
        .logprobs
    )
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert lp.text_offset == [0, 1, 2] and lp.top_logprobs[0] == {"a": -0.5, "b": -1.5}


def test_stream_equals_whole(client):
    kwargs = dict(model="fake-model", prompt="hello", max_tokens=30, temperature=0)
    whole = client.completions.create(**kwargs).choices[0].text
    pieces = [
        c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices
    ]
    assert "".join(pieces) == whole and len(pieces) > 1


def test_seeded_sampling_reproducible(client):
    def run(seed):
        return client.chat.completions.create(
            model="fake-model",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=12,
            seed=seed,
            temperature=1.0,
            n=2,
        ).choices

    first, again, other = run(7), run(7), run(8)
    assert [c.message.content for c in first] == [c.message.content for c in again]
    assert first[0].message.content != first[1].message.content  # the n samples differ
    assert [c.message.content for c in first] != [c.message.content for c in other]


def test_chat_stream_format(http):
    body = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logprobs": True,
        "top_logprobs": 1,
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _sse(response.iter_lines())
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [e["choices"][0] for e in events[1:-2]]
    assert "".join(c["delta"].get("content", "") for c in content) != ""
    assert content[-1]["finish_reason"] == "length"
    assert all(len(c["logprobs"]["content"][0]["top_logprobs"]) == 1 for c in content)
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 4
    assert all(e["usage"] is None for e in events[:-2])


def test_auth(server):
    body = {"prompt": "x", "max_tokens": 1}
    url = server.url + "v1/completions"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.post(url, json=body, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}).is_success
    assert httpx.post(server.url + "tokenize", json={"prompt": "x"}).status_code == 401
    assert httpx.get(server.url + "v1/models").status_code == 401
    assert httpx.get(server.url + "health").status_code == 200  # open for supervisors
    assert httpx.get(server.url + "metrics").status_code == 200


def test_host_and_origin_checks(server, http):
    port = server.url.rsplit(":", 1)[1].rstrip("/")
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.nip.io"):
        response = http.get("/v1/models", headers={"Host": host})
        assert (
            response.status_code == 403 and "allowed-hosts" in response.json()["error"]["message"]
        )
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "[::1]", "app.localhost"):
        assert http.get("/v1/models", headers={"Host": host}).status_code == 200
    evil = http.get("/v1/models", headers={"Origin": "http://evil.example"})
    assert evil.status_code == 403 and "access-control-allow-origin" not in evil.headers
    good = http.get("/v1/models", headers={"Origin": GOOD_ORIGIN})
    assert good.headers["access-control-allow-origin"] == GOOD_ORIGIN
    same = http.get("/v1/models", headers={"Origin": server.url.rstrip("/")})
    assert same.status_code == 200 and "access-control-allow-origin" not in same.headers
    preflight = http.options(
        "/v1/chat/completions",
        headers={
            "Origin": GOOD_ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert preflight.status_code == 200


def test_queue_full_is_429_with_retry_after(server, http):
    body = {"prompt": "x", "max_tokens": 200, "stream": True}
    responses, ready = [], threading.Barrier(5)

    def hold():
        with http.stream("POST", "/v1/completions", json=body) as response:
            responses.append(response.status_code)
            ready.wait()
            for _ in response.iter_lines():
                pass

    threads = [threading.Thread(target=hold) for _ in range(4)]  # 2 running + 2 queued
    for thread in threads:
        thread.start()
    ready.wait(timeout=10)
    rejected = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert rejected.status_code == 429
    assert int(rejected.headers["retry-after"]) >= 1
    assert rejected.json()["error"]["type"] == "rate_limit_error"
    for thread in threads:
        thread.join()
    assert responses == [200] * 4
    assert "hearth_requests_rejected_total" in httpx.get(server.url + "metrics").text


def test_disconnect_aborts_streaming_and_blocking(server, http):
    engine = server.context.engine
    body = {"prompt": "x", "max_tokens": 250}
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        next(response.iter_lines())
    _wait(lambda: engine.num_in_flight == 0, timeout_s=1.0)  # 250 steps would take >1.2 s
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json=body, timeout=0.2)
    _wait(lambda: engine.num_in_flight == 0, timeout_s=1.0)
    _wait(lambda: engine.snapshot().blocks.num_used == 0)
    text = httpx.get(server.url + "metrics").text
    assert metric(text, "vllm:kv_cache_usage_perc") == 0.0


def test_one_failing_request_does_not_hurt_others(client, http):
    failed = http.post("/v1/completions", json={"prompt": "__add_fails__", "max_tokens": 2})
    assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
    assert client.completions.create(model="fake-model", prompt="ok", max_tokens=2).choices


def test_tokenize_detokenize(http):
    ids = http.post("/tokenize", json={"prompt": "hi"}).json()
    assert ids["tokens"] == [1, ord("h"), ord("i")] and ids["count"] == 3
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] == len("<user>hi\n<assistant>")
    text = http.post("/detokenize", json={"tokens": [ord("o"), ord("k")]}).json()
    assert text == {"prompt": "ok"}


def test_metrics_names(server, client):
    client.completions.create(model="fake-model", prompt="m", max_tokens=3)
    text = httpx.get(server.url + "metrics").text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_sum",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:num_preemptions_total",
        "hearth_kv_cache_blocks",
        "hearth_gpu_count",
        "hearth_host_cpu_utilization_ratio",
        "hearth_requests_in_flight",
    ):
        assert name in text, name
    assert metric(text, "vllm:generation_tokens_total") >= 3


def test_bench_serve_script(server, tmp_path):
    path = Path(__file__).resolve().parents[1] / "bench" / "serve.py"
    spec = importlib.util.spec_from_file_location("bench_serve", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_serve"] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    out = tmp_path / "result.json"
    argv = [
        "--base-url",
        server.url.rstrip("/"),
        "--api-key",
        KEY,
        "--num-prompts",
        "4",
        "--input-len",
        "8",
        "--output-len",
        "5",
        "--max-concurrency",
        "2",
        "--result-json",
        str(out),
    ]
    assert bench.main(argv) == 0
    summary = json.loads(out.read_text())["summary"]
    assert summary["completed"] == 4 and summary["total_output_tokens"] == 20
    assert summary["total_input_tokens"] == 32
    assert 0 < summary["median_ttft_ms"] <= summary["p99_e2el_ms"]
    assert summary["mean_itl_ms"] > 0
