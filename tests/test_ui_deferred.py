"""`hearth serve` mounts the UI once the model is ready (ui/deferred.py): until then / is a
self-refreshing placeholder (503), the API answers as soon as the engine is ready, and the real
gradio UI follows. A model that fails to load stops the placeholder's refreshing, and the
server exits as it does without the UI."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from fake_engine import FakeEngine
from server_harness import RunningServer, wait_healthy

from hearth.appliance.lifecycle import bind, make_server
from hearth.appliance.routes import create_app
from hearth.appliance.settings import Settings

pytest.importorskip("gradio")


def _serve(factory):
    from hearth.ui.deferred import mount_ui_when_ready

    settings = Settings(port=0, max_num_seqs=2)
    sock = bind("127.0.0.1", 0)
    app = create_app(settings, factory)
    deferred = mount_ui_when_ready(app, app.state.hearth)
    server = make_server(app, app.state.hearth, sock)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    return RunningServer(server.url, server, app.state.hearth, thread), deferred, sock


def _stop(running: RunningServer, sock) -> None:
    running.server.should_exit = True
    running.thread.join(60)
    sock.close()


def _wait(predicate, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError


def test_placeholder_then_api_then_the_real_ui():
    release = threading.Event()

    def factory():
        release.wait(60)
        return FakeEngine(max_num_seqs=2)

    running, deferred, sock = _serve(factory)
    try:
        _wait(lambda: _get(running, "health") is not None)
        page = httpx.get(running.url, timeout=10)
        assert page.status_code == 503 and 'http-equiv="refresh"' in page.text
        assert "loading" in page.text and page.headers["retry-after"] == "1"
        assert httpx.get(running.url + "v1/models", timeout=10).status_code == 503

        release.set()
        wait_healthy(running, 60)
        models = httpx.get(running.url + "v1/models", timeout=10)  # the API does not wait
        assert models.status_code == 200 and models.json()["data"][0]["id"] == "fake-model"

        _wait(lambda: deferred.target is not None, 120)
        page = httpx.get(running.url, timeout=30)
        assert page.status_code == 200 and "gradio" in page.text.lower()
        config = httpx.get(running.url + "config", timeout=30)
        assert config.status_code == 200 and "components" in config.json()
        assert httpx.get(running.url + "health", timeout=10).status_code == 200  # still first
    finally:
        release.set()
        _stop(running, sock)


def test_a_model_that_fails_to_load_stops_the_placeholder_and_the_server_exits():
    def factory():
        raise ValueError("no such model")

    running, deferred, sock = _serve(factory)
    try:
        _wait(lambda: deferred.failed)
        assert "could not be loaded" in deferred.message and deferred.target is None
        running.thread.join(30)  # the server exits non-zero, as without the UI
        assert not running.thread.is_alive() and running.server.exit_code == 1
    finally:
        _stop(running, sock)


def _get(running: RunningServer, path: str):
    try:
        return httpx.get(running.url + path, timeout=5)
    except httpx.HTTPError:
        return None
