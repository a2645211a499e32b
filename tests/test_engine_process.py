"""`hearth serve --engine-process`: the engine in a process of its own (engine_process.py).

The HTTP behaviours over the fake engine run in both modes in test_server_fake.py and
test_server_lifecycle.py; here: what only a second process can do wrong (it is killed, it cannot
load, it outlives the server) and the real default model through it (greedy answers equal the
engine thread's, a JSON schema's grammar compiled again in the engine process, the KV cache free
afterwards, the /metrics and snapshot round trips)."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
from fake_engine import FakeEngine, failing_factory
from server_harness import metric, running_server

from hearth.appliance.settings import Settings
from hearth.cli import engine_factory

FAKE = Settings(no_ui=True, shutdown_timeout=0.5, engine_process=True)


def _wait(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_engine_runs_in_another_process_and_stops_with_the_server():
    with running_server(FAKE, functools.partial(FakeEngine, step_delay_s=0.001)) as server:
        pid = server.context.engine.engine_pid
        assert pid is not None and pid != os.getpid()
        os.kill(pid, 0)  # alive
        if sys.platform.startswith("linux"):  # operators see it by name in top and ps
            assert Path(f"/proc/{pid}/comm").read_text().strip() == "hearth-engine"
        answer = httpx.post(server.url + "v1/completions", json={"prompt": "x", "max_tokens": 3})
        assert answer.status_code == 200
    _wait(lambda: _gone(pid))


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_killed_engine_process_fails_requests_and_the_server_exits_1():
    with running_server(FAKE, functools.partial(FakeEngine, step_delay_s=0.01)) as server:
        body = {"prompt": "x", "max_tokens": 200, "stream": True}
        with httpx.stream("POST", server.url + "v1/completions", json=body) as stream:
            lines = stream.iter_lines()
            next(lines)
            os.kill(server.context.engine.engine_pid, signal.SIGKILL)
            events = [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "service_unavailable"
        assert "exited with code -9" in error["message"]
        assert "exited with code -9" in str(server.context.engine.error)
        server.thread.join(10)  # the server exits at once (new requests: refused or 503)
        assert server.server.exit_code == 1


def test_a_model_that_cannot_load_in_the_engine_process_is_reported():
    with running_server(FAKE, functools.partial(failing_factory, "no such model: /x.gguf"),
                        wait_ready=False) as server:
        _wait(lambda: server.context.engine.error is not None, timeout_s=60)
        assert "no such model" in str(server.context.engine.error)
        server.thread.join(10)
        assert server.server.exit_code == 1


def test_the_engine_process_ignores_sigint_sigterm_and_sighup():
    """The API process drains on SIGTERM and then stops the engine, and reloads its keys on
    SIGHUP: a signal to the whole group (systemd, Ctrl-C, a closed terminal) must not kill the
    engine under the streams being drained."""
    with running_server(FAKE, functools.partial(FakeEngine, step_delay_s=0.001)) as server:
        pid = server.context.engine.engine_pid
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGHUP)
        time.sleep(0.3)
        answer = httpx.post(server.url + "v1/completions", json={"prompt": "x", "max_tokens": 3})
        assert answer.status_code == 200


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


def _answers(settings: Settings) -> dict:
    """Greedy and JSON-schema answers of a server with `settings`, and its KV use after."""
    with running_server(settings, engine_factory(settings)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=300)
        model = client.models.list().data[0].id
        chat = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24, temperature=0).choices[0].message.content
        streamed = "".join(
            chunk.choices[0].text for chunk in client.completions.create(
                model=model, prompt="def fibonacci(n):", max_tokens=24, temperature=0,
                stream=True) if chunk.choices)
        person = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Describe a person."}],
            max_tokens=48, temperature=0,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "person", "schema": PERSON}},
        ).choices[0].message.content
        # A stop string: found in the API process (appliance/text_streams.py), which ends the
        # answer there and aborts the request in the engine (its blocks come back, below).
        stopped = client.completions.create(
            model=model, prompt="def fibonacci(n):", max_tokens=24, temperature=0,
            stop=["fib", "\n\n"])
        stopped_stream = [
            (chunk.choices[0].text, chunk.choices[0].finish_reason)
            for chunk in client.completions.create(
                model=model, prompt="def fibonacci(n):", max_tokens=24, temperature=0,
                stop=["fib", "\n\n"], stream=True) if chunk.choices]
        sampled = [choice.text for choice in client.completions.create(  # n > 1: engine deltas
            model=model, prompt="The sea is", max_tokens=8, temperature=0.8, seed=3, n=2,
            logprobs=1).choices]
        _wait(lambda: server.context.engine.snapshot().blocks.num_used == 0, timeout_s=10)
        metrics = httpx.get(server.url + "metrics").text
        snapshot = server.context.engine.snapshot()
        return {"chat": chat, "streamed": streamed, "person": person,
                "stopped": (stopped.choices[0].text, stopped.choices[0].finish_reason,
                            stopped.usage.completion_tokens),
                "stopped_stream": stopped_stream, "sampled": sampled,
                "kv_usage": metric(metrics, "vllm:kv_cache_usage_perc"),
                "blocks_used": snapshot.blocks.num_used,
                "prompt_tokens": metric(metrics, "vllm:prompt_tokens_total")}


def test_the_default_model_answers_the_same_through_the_engine_process():
    settings = Settings(device="cpu", no_ui=True, max_model_len=512, kv_cache_gib=0.05)
    thread = _answers(settings)
    process = _answers(Settings(device="cpu", no_ui=True, max_model_len=512, kv_cache_gib=0.05,
                                engine_process=True))
    assert process == thread
    assert process["stopped"][1] == "stop" and "fib" not in process["stopped"][0]
    assert process["stopped_stream"][-1][1] == "stop"
    person = json.loads(process["person"])
    assert set(person) == {"name", "age"} and isinstance(person["age"], int)
    assert process["kv_usage"] == 0.0 and process["blocks_used"] == 0
    assert process["prompt_tokens"] > 0


def test_a_factory_that_does_not_pickle_is_reported_not_hung():
    with running_server(FAKE, lambda: FakeEngine(), wait_ready=False) as server:
        _wait(lambda: server.context.engine.error is not None, timeout_s=30)
        assert "pickle" in str(server.context.engine.error).lower()
        server.thread.join(10)
        assert server.server.exit_code == 1


_SERVE = """
import functools, sys
sys.path.insert(0, {tests!r})
from fake_engine import FakeEngine
from hearth.appliance.settings import Settings
from hearth.cli import serve
settings = Settings(port=0, no_ui=True, log_level="warning", engine_process=True,
                    shutdown_timeout=30)
sys.exit(serve(settings, functools.partial(FakeEngine, step_delay_s=0.02)))
"""


def _spawned_child(pid: int) -> int:
    """The engine process: the child of `pid` that multiprocessing spawned (not its resource
    tracker)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
    raise AssertionError("no engine process")


def test_a_forced_exit_still_stops_the_engine_process():
    """A second SIGTERM while draining (systemd's, or `timeout` signalling the whole group)
    makes the server exit at once, past its shutdown: the engine process must go too, and the
    server must not hang joining it."""
    code = _SERVE.format(tests=str(Path(__file__).parent))
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        url = next(line.split()[3] for line in server.stdout if line.startswith("Hearth is ready"))
        engine_pid = _spawned_child(server.pid)
        body = {"prompt": "x", "max_tokens": 200, "stream": True}
        with httpx.stream("POST", url + "v1/completions", json=body) as stream:
            next(stream.iter_lines())
            server.send_signal(signal.SIGTERM)  # drains: the stream may run 30 s
            time.sleep(0.3)
            server.send_signal(signal.SIGTERM)  # forced
            server.wait(30)
        _wait(lambda: _gone(engine_pid), timeout_s=15)
    finally:
        server.kill()
        server.wait(10)
