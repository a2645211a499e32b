"""Run a Hearth server in this process, on a free loopback port, for the API tests.

One server per test module (module-scoped fixtures): the real model takes seconds to load.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from hearth.appliance.lifecycle import HearthServer, bind, make_server
from hearth.appliance.routes import AppContext, create_app
from hearth.appliance.settings import Settings


@dataclass
class RunningServer:
    url: str  # http://127.0.0.1:PORT/
    server: HearthServer
    context: AppContext
    thread: threading.Thread

    @property
    def base_url(self) -> str:
        return self.url + "v1"


@contextlib.contextmanager
def running_server(
    settings: Settings,
    engine_factory: Callable[[], Any],
    ready_timeout_s: float = 300,
    wait_ready: bool = True,
) -> Iterator[RunningServer]:
    sock = bind("127.0.0.1", 0)
    app = create_app(settings, engine_factory)
    server = make_server(app, app.state.hearth, sock)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    running = RunningServer(server.url, server, app.state.hearth, thread)
    try:
        if wait_ready:
            wait_healthy(running, ready_timeout_s)
        yield running
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def wait_healthy(running: RunningServer, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if running.context.engine.error is not None:
            raise RuntimeError(f"the engine failed to load: {running.context.engine.error}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(running.url + "health", timeout=5).status_code == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(f"server not healthy after {timeout_s} s")


def metric(text: str, name: str) -> float:
    """The value of a sample in Prometheus text, e.g. metric(t, 'vllm:kv_cache_usage_perc')."""
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)
