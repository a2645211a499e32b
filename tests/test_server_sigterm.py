"""A real `hearth serve` process with the real model: configured through flags and HEARTH_*
variables, it answers 429 when its queue is full, and on SIGTERM it ends the in-flight streams
cleanly (a last chunk, then [DONE]) and exits with status 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    log = tmp_path_factory.mktemp("hearth") / "stderr.txt"
    env = {
        **os.environ,
        "HEARTH_DEVICE": "cpu",
        "HEARTH_NO_UI": "1",
        "HEARTH_SHUTDOWN_TIMEOUT": "2",
        "HEARTH_PORT": "8000",
    }
    command = [
        sys.executable,
        "-m",
        "hearth",
        "serve",
        "--port",
        "0",
        "--max-num-seqs",
        "1",
        "--max-queued-requests",
        "1",
        "--max-model-len",
        "1024",
    ]
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True
        )
    url = _ready_url(process, log)
    yield process, url
    if process.poll() is None:
        process.kill()
        process.wait()


def _ready_url(process: subprocess.Popen, log: Path) -> str:
    for line in process.stdout:
        if line.startswith("Hearth is ready: "):
            return line.split()[3]
    raise AssertionError(f"exited with {process.wait()} before ready:\n{log.read_text()}")


def _stream(url: str, results: list, started: threading.Event) -> None:
    body = {
        "prompt": "Tell me a long story.",
        "max_tokens": 800,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", url + "v1/completions", json=body, timeout=120) as response:
        started.set()
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    results.append((response.status_code, lines))


def test_queue_full_then_sigterm_drains_and_exits_zero(served):
    process, url = served
    assert url.startswith("http://127.0.0.1:") and not url.endswith(":8000/")  # flag beats env
    results: list = []
    threads = []
    for _ in range(2):  # one runs (max-num-seqs 1), one waits (max-queued-requests 1)
        started = threading.Event()
        threads.append(threading.Thread(target=_stream, args=(url, results, started)))
        threads[-1].start()
        assert started.wait(60)
    busy = httpx.post(url + "v1/completions", json={"prompt": "hi", "max_tokens": 1})
    assert busy.status_code == 429 and int(busy.headers["Retry-After"]) >= 1

    process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert httpx.get(url + "health").status_code == 503  # draining: a balancer stops sending
    for thread in threads:
        thread.join(60)
    assert process.wait(timeout=60) == 0
    assert [status for status, _ in results] == [200, 200]
    for _, lines in results:
        assert lines[-1] == "data: [DONE]"
        last = json.loads(lines[-2].removeprefix("data: "))
        assert last["choices"][0]["finish_reason"] == "abort"  # 800 tokens take far over 2 s
