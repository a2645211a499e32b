"""`hearth doctor` on this machine (no GPU): every line sensible, and failures named with a fix."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _doctor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "hearth", "doctor", *args]
    environ = {**os.environ, **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=environ)


def _lines(output: str) -> dict[str, tuple[str, str]]:
    """check name → (status, detail), from lines like `OK    port       127.0.0.1:8000 is free`."""
    table = {}
    for line in output.splitlines():
        parts = line.split(maxsplit=2)
        if len(parts) == 3 and parts[0] in ("OK", "WARN", "FAIL"):
            table[parts[1]] = (parts[0], parts[2])
    return table


@pytest.fixture
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_doctor_on_this_machine(free_port):
    result = _doctor("--port", str(free_port))
    checks = _lines(result.stdout)
    assert list(checks) == [
        "python", "packages", "torch", "cpu", "gpu", "model", "checksums", "memory", "disk", "port"
    ]  # fmt: skip
    assert result.returncode == 0, result.stdout
    assert checks["python"][1].startswith(".".join(map(str, sys.version_info[:3])))
    assert checks["torch"][0] == "OK" and "2." in checks["torch"][1]
    assert checks["cpu"][0] == "OK" and f"{os.cpu_count()} cores" in checks["cpu"][1]
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if " amx_bf16" in flags or " avx512_bf16" in flags:  # this machine: the fast path is named
        assert "--dtype bfloat16 --gguf-keep-quantized" in checks["cpu"][1]
    import torch

    if not torch.cuda.is_available():
        assert checks["gpu"][0] == "WARN" and "no NVIDIA GPU" in checks["gpu"][1]
    assert checks["model"][0] == "OK" and "smollm2-135m-instruct" in checks["model"][1]
    assert checks["checksums"] == ("OK", "OK smollm2-135m-instruct: 1 file(s) match their sha256")
    assert checks["memory"][0] == "OK" and "GiB available" in checks["memory"][1]
    assert checks["disk"][0] == "OK" and "GiB free" in checks["disk"][1]
    assert checks["port"] == ("OK", f"127.0.0.1:{free_port} is free")
    assert result.stdout.rstrip().endswith("ready to serve")


def test_doctor_names_a_busy_port_and_a_modified_model(tmp_path):
    weights = tmp_path / "m.gguf"
    weights.write_bytes(b"GGUF" + bytes(1000))
    catalog = tmp_path / "models.toml"
    env = {"HEARTH_MODELS_TOML": str(catalog)}
    add = subprocess.run(
        [sys.executable, "-m", "hearth", "models", "add", "m", str(weights)],
        env={**os.environ, **env}, capture_output=True, text=True,
    )  # fmt: skip
    assert add.returncode == 0, add.stdout + add.stderr
    weights.write_bytes(b"GGUF" + bytes(999) + b"x")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _doctor(env={**env, "HEARTH_PORT": str(port)})
    checks = _lines(result.stdout)
    assert result.returncode == 1
    assert checks["port"][0] == "FAIL" and "HEARTH_PORT" in checks["port"][1]
    assert checks["checksums"][0] == "FAIL" and str(weights) in checks["checksums"][1]
    assert "2 check(s) failed" in result.stdout


def test_doctor_unknown_model_fails_with_the_choices():
    result = _doctor("--model", "no-such-model", "--port", "0")
    status, detail = _lines(result.stdout)["model"]
    assert result.returncode == 1 and status == "FAIL"
    assert "smollm2-135m-instruct" in detail and ".gguf" in detail
