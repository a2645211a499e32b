"""`hearth serve --tensor-parallel-size 2` on CPU, supervised: SIGTERM stops the server and every
worker (no orphans); a worker killed mid-stream ends the service with a non-zero exit status and
a log line naming the worker, and leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from helpers import save_tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tp") / "llama", "llama")


def _serve(model: Path, log: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "HEARTH_NO_UI": "1", "HEARTH_SHUTDOWN_TIMEOUT": "2"}
    command = [sys.executable, "-m", "hearth", "serve", "--model", str(model), "--device", "cpu",
               "--dtype", "float32", "--port", "0", "--kv-cache-gib", "0.03",
               "--tensor-parallel-size", "2"]
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                   stderr=stderr, text=True)
    for line in process.stdout:
        if line.startswith("Hearth is ready: "):
            return process, line.split()[3]
    raise AssertionError(f"exited with {process.wait()} before ready:\n{log.read_text()}")


def _workers(process: subprocess.Popen) -> list[psutil.Process]:
    children = psutil.Process(process.pid).children(recursive=True)
    return [c for c in children if "spawn_main" in " ".join(c.cmdline())]


def _gone(processes: list[psutil.Process], timeout_s: float = 30) -> bool:
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    return not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def test_sigterm_stops_the_server_and_every_worker(tiny, tmp_path):
    process, url = _serve(tiny, tmp_path / "log.txt")
    try:
        workers = _workers(process)
        assert len(workers) == 1
        body = {"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0}
        assert httpx.post(url + "v1/completions", json=body, timeout=120).status_code == 200
        everything = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
        assert _gone(everything), [p.cmdline() for p in everything if p.is_running()]
    finally:
        if process.poll() is None:
            process.kill()


def test_worker_killed_mid_stream_ends_the_service_non_zero(tiny, tmp_path):
    log = tmp_path / "log.txt"
    process, url = _serve(tiny, log)
    try:
        [worker] = _workers(process)
        everything = psutil.Process(process.pid).children(recursive=True)
        body = {"prompt": [5, 6, 7], "max_tokens": 400, "ignore_eos": True, "stream": True}
        statuses: list[int] = []

        def stream() -> None:
            try:
                with httpx.stream("POST", url + "v1/completions", json=body,
                                  timeout=120) as response:
                    statuses.append(response.status_code)
                    for _ in response.iter_lines():
                        pass
            except httpx.HTTPError:
                statuses.append(-1)

        client = threading.Thread(target=stream)
        client.start()
        deadline = time.monotonic() + 60
        while not statuses and time.monotonic() < deadline:
            time.sleep(0.05)
        worker.send_signal(signal.SIGKILL)
        assert process.wait(timeout=120) == 1
        client.join(60)
        text = log.read_text()
        assert f"tensor-parallel worker rank 1 (pid {worker.pid}) exited with code -9" in text
        assert _gone(everything)
    finally:
        if process.poll() is None:
            process.kill()
