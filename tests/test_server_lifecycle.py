"""Process lifecycle over a fake engine: 503 while loading, engine-thread death (503 everywhere,
exit status 1), and SIGTERM draining (in-flight streams end cleanly, exit status 0). The real
SIGTERM of a real `hearth serve` process is in test_server_sigterm.py."""

from __future__ import annotations

import dataclasses
import functools
import json
import signal
import threading
import time

import httpx
import pytest
from fake_engine import FakeEngine
from server_harness import running_server, wait_healthy

from hearth.appliance.settings import Settings

SETTINGS = Settings(no_ui=True, shutdown_timeout=0.5)


def _events(lines) -> list:
    return [
        line[6:] if line == "data: [DONE]" else json.loads(line[6:])
        for line in lines
        if line.startswith("data: ")
    ]


def test_health_is_503_until_the_model_is_loaded():
    loaded = threading.Event()

    def slow_factory():
        loaded.wait(30)
        return FakeEngine()

    with running_server(SETTINGS, slow_factory, wait_ready=False) as server:
        deadline = time.monotonic() + 10
        while True:  # the socket is bound before uvicorn runs; wait for the first answer
            try:
                health = httpx.get(server.url + "health")
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        assert (health.status_code, health.json()) == (503, {"status": "loading"})
        early = httpx.post(server.url + "v1/completions", json={"prompt": "x"})
        assert early.status_code == 503 and "loading" in early.json()["error"]["message"]
        assert httpx.get(server.url + "v1/models").status_code == 503
        loaded.set()
        wait_healthy(server, 10)
        assert httpx.post(server.url + "v1/completions", json={"prompt": "x"}).is_success


@pytest.mark.parametrize("engine_process", [False, True], ids=["engine-thread", "engine-process"])
def test_engine_death_fails_requests_and_exits_nonzero(engine_process):
    settings = dataclasses.replace(SETTINGS, engine_process=engine_process)
    with running_server(settings, functools.partial(FakeEngine, step_delay_s=0.01)) as server:
        body = {"prompt": "x", "max_tokens": 200, "stream": True}
        with httpx.stream("POST", server.url + "v1/completions", json=body) as stream:
            lines = stream.iter_lines()
            next(lines)
            crash = httpx.post(server.url + "v1/completions", json={"prompt": "__crash__"})
            events = _events(lines)
        assert crash.status_code == 503
        assert "stopped after an error" in crash.json()["error"]["message"]
        assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "service_unavailable"
        server.thread.join(10)
        assert not server.thread.is_alive()
        assert server.server.exit_code == 1


@pytest.mark.parametrize("engine_process", [False, True], ids=["engine-thread", "engine-process"])
def test_sigterm_drains_then_exits_zero(engine_process):
    settings = dataclasses.replace(SETTINGS, engine_process=engine_process)
    with running_server(settings, functools.partial(FakeEngine, step_delay_s=0.01)) as server:
        short = {"prompt": "x", "max_tokens": 20, "stream": True}  # ~0.2 s: finishes
        long = {"prompt": "x", "max_tokens": 240, "stream": True}  # ~2.4 s: aborted at 0.5 s
        with (
            httpx.stream("POST", server.url + "v1/completions", json=short) as s1,
            httpx.stream("POST", server.url + "v1/completions", json=long) as s2,
        ):
            lines1, lines2 = s1.iter_lines(), s2.iter_lines()
            next(lines1)
            next(lines2)
            server.server.handle_exit(signal.SIGTERM, None)
            time.sleep(0.05)
            refused = httpx.post(server.url + "v1/completions", json={"prompt": "x"})
            health = httpx.get(server.url + "health")
            first, second = _events(lines1), _events(lines2)
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        assert (health.status_code, health.json()) == (503, {"status": "draining"})
        assert first[-1] == second[-1] == "[DONE]"
        assert first[-2]["choices"][0]["finish_reason"] == "length"
        assert second[-2]["choices"][0]["finish_reason"] == "abort"
        server.thread.join(10)
        assert not server.thread.is_alive() and server.server.exit_code == 0
