"""/api over the fake engine (tests/fake_engine.py), where timing is exact: 429 backpressure,
a client hanging up on a stream: false request, a failing request, and the metrics. The real
model and the official client are in test_ollama_api.py."""

from __future__ import annotations

import functools
import json
import threading
import time

import httpx
import pytest
from fake_engine import FakeEngine
from server_harness import metric, running_server

from hearth.appliance.settings import Settings

MODEL = "fake-model"


@pytest.fixture(scope="module", params=[False, True], ids=["engine-thread", "engine-process"])
def server(request):
    """Every test of the Ollama API runs with the engine on a thread and in its own process."""
    settings = Settings(max_num_seqs=2, max_queued_requests=2, no_ui=True,
                        engine_process=request.param)
    with running_server(settings, functools.partial(FakeEngine, max_num_seqs=2)) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def _wait(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _chat(**fields):
    return {"model": MODEL, "messages": [{"role": "user", "content": "x"}], **fields}


def test_queue_full_is_429_in_ollama_format(server, http):
    body = _chat(options={"num_predict": 200})
    statuses, ready = [], threading.Barrier(5)

    def hold():
        with http.stream("POST", "/api/chat", json=body) as response:
            statuses.append(response.status_code)
            ready.wait()
            for _ in response.iter_lines():
                pass

    threads = [threading.Thread(target=hold) for _ in range(4)]  # 2 running + 2 queued
    for thread in threads:
        thread.start()
    ready.wait(timeout=10)
    rejected = http.post("/api/generate", json={"model": MODEL, "prompt": "x", "stream": False})
    assert rejected.status_code == 429 and int(rejected.headers["retry-after"]) >= 1
    assert "the server is busy" in rejected.json()["error"]
    for thread in threads:
        thread.join()
    assert statuses == [200] * 4


def test_hanging_up_aborts_streamed_and_whole_requests(server, http):
    engine = server.context.engine
    body = _chat(options={"num_predict": 200})  # 200 steps take > 1 s
    with http.stream("POST", "/api/chat", json=body) as response:
        next(response.iter_lines())  # hang up after the first line
    _wait(lambda: engine.num_in_flight == 0, timeout_s=1.0)
    with pytest.raises(httpx.ReadTimeout):
        http.post("/api/generate", json={"model": MODEL, "prompt": "x", "stream": False,
                                         "options": {"num_predict": 200}}, timeout=0.2)
    _wait(lambda: engine.num_in_flight == 0, timeout_s=1.0)
    _wait(lambda: engine.snapshot().blocks.num_used == 0)


def test_a_failing_request_is_an_ollama_error_and_the_server_goes_on(http):
    failed = http.post("/api/generate", json={"model": MODEL, "prompt": "__add_fails__",
                                              "stream": False})
    assert failed.status_code == 500 and "failed" in failed.json()["error"]
    ok = http.post("/api/generate", json={"model": MODEL, "prompt": "ok", "stream": False,
                                          "options": {"num_predict": 2}})
    assert ok.status_code == 200 and ok.json()["eval_count"] == 2


def test_length_errors_speak_of_num_predict(http):
    body = {"model": MODEL, "prompt": "x", "stream": False, "options": {"num_predict": 250}}
    answer = http.post("/api/generate", json=body)
    assert answer.status_code == 400
    assert "num_predict is 250" in answer.json()["error"] and "max_tokens" not in answer.text


def test_metrics_count_api_requests(server, http):
    def count(name: str) -> float:
        return metric(httpx.get(server.url + "metrics").text, name)

    before = count("vllm:generation_tokens_total")
    answer = http.post("/api/chat", json=_chat(stream=False, options={"num_predict": 5}))
    assert answer.json()["eval_count"] == 5
    assert count("vllm:generation_tokens_total") == before + 5


# ---- thinking and tool calls: a server told the model thinks, answers recorded (__say:...__) ----

THOUGHT = "<think>\nThe user wants the weather.\n</think>\n\n"
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def thinking_http():
    settings = Settings(no_ui=True, reasoning_parser="think", tool_call_parser="hermes")
    with running_server(settings, lambda: FakeEngine(max_model_len=4096)) as running:
        with httpx.Client(base_url=running.url, timeout=30) as client:
            yield client


def _say(text: str, **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"__say:{text}__"}],
            "options": {"temperature": 0}, **fields}


def test_show_lists_thinking_when_the_server_splits_reasoning(http, thinking_http):
    shown = thinking_http.post("/api/show", json={"model": MODEL}).json()
    assert shown["capabilities"] == ["completion", "tools", "thinking"]
    assert http.post("/api/show", json={"model": MODEL}).json()["capabilities"] == [
        "completion", "tools"]  # the fake template writes no <think>


def test_think_splits_thinking_from_content_whole_and_streamed(thinking_http):
    body = _say(THOUGHT + "It is sunny.", think=True)
    message = thinking_http.post("/api/chat", json={**body, "stream": False}).json()["message"]
    assert message["thinking"] == "\nThe user wants the weather.\n"
    assert message["content"] == "It is sunny."
    with thinking_http.stream("POST", "/api/chat", json=body) as response:
        lines = [json.loads(line) for line in response.iter_lines() if line]
    thinking = "".join(line["message"].get("thinking", "") for line in lines)
    content = "".join(line["message"]["content"] for line in lines)
    assert thinking == "\nThe user wants the weather.\n" and content == "It is sunny."
    off = thinking_http.post("/api/chat", json={**_say("Sunny.", think=False), "stream": False})
    assert off.status_code == 200 and off.json()["message"]["content"] == "Sunny."


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_come_back_with_arguments_as_objects(thinking_http, stream):
    body = _say(THOUGHT + CALL, tools=TOOLS, stream=stream)
    with thinking_http.stream("POST", "/api/chat", json=body) as response:
        lines = [json.loads(line) for line in response.iter_lines() if line]
    calls = [c for line in lines for c in line["message"].get("tool_calls") or []]
    assert [c["function"] for c in calls] == [{"name": "get_weather",
                                               "arguments": {"city": "Paris"}}]
    assert "".join(line["message"]["content"] for line in lines) == ""
    assert lines[-1]["done"]
