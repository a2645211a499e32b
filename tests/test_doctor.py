"""`hearth doctor` on this machine (no GPU): every line sensible, and failures named with a fix."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hearth.appliance.tools import doctor

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
        "python", "packages", "torch", "lock", "cpu", "gpu", "model", "checksums", "memory",
        "context", "disk", "port",
    ]
    assert result.returncode == 0, result.stdout
    assert checks["python"][1].startswith(".".join(map(str, sys.version_info[:3])))
    assert checks["torch"][0] == "OK" and "2." in checks["torch"][1]
    _check_lock_line(checks["lock"])
    assert checks["cpu"][0] == "OK" and f"{os.cpu_count()} cores" in checks["cpu"][1]
    from hearth.engine.cpu_precision import cpu_has_fast_int4_gemv

    if cpu_has_fast_int4_gemv():  # this machine (AVX2 + FMA or better): the fast path is named
        assert "int4 GEMV" in checks["cpu"][1] or "native CPU kernels" in checks["cpu"][1], (
            checks["cpu"])
    import torch

    if not torch.cuda.is_available():
        assert checks["gpu"][0] == "WARN" and "no NVIDIA GPU" in checks["gpu"][1]
    assert checks["model"][0] == "OK" and "smollm2-135m-instruct" in checks["model"][1]
    assert checks["checksums"] == ("OK", "OK smollm2-135m-instruct: 1 file(s) match their sha256")
    assert checks["memory"][0] == "OK" and "GiB available" in checks["memory"][1]
    assert checks["context"][0] == "OK" and "max_model_len 8192" in checks["context"][1]
    assert "--max-model-len auto would pick" in checks["context"][1]
    assert checks["disk"][0] == "OK" and "GiB free" in checks["disk"][1]
    assert checks["port"] == ("OK", f"127.0.0.1:{free_port} is free")
    assert result.stdout.rstrip().endswith("ready to serve")


def _check_lock_line(line: tuple[str, str]) -> None:
    """OK where this venv holds the lock's versions (`make test`), else WARN naming the first
    differences (.ci/latest runs the suite on the newest versions)."""
    name = doctor.LOCK_FILES[doctor.lock_variant()]
    differences = doctor.lock_differences(doctor.read_lock(name), doctor.installed_versions())
    if differences:
        assert line[0] == "WARN" and line[1].startswith(f"{len(differences)} differ from {name}: ")
        assert differences[0] in line[1]
    else:
        assert line[0] == "OK" and line[1].startswith(f"installed versions match {name} (")


def test_lock_differences_name_the_installed_and_the_locked_version():
    locked = doctor.parse_lock(
        "# a header\nNumPy==2.4.6\n    # via hearth\ntorch==2.13.0+cpu\ntyping_extensions==4.0\n"
        "gone==1.0 ; python_version < '3.11'\n"
    )
    assert locked == {"numpy": "2.4.6", "torch": "2.13.0+cpu", "typing-extensions": "4.0",
                      "gone": "1.0"}
    installed = {"numpy": "2.4.5", "torch": "2.13.0+cpu", "typing-extensions": "4.1", "extra": "1"}
    assert doctor.lock_differences(locked, installed) == [
        "numpy installed 2.4.5, lock 2.4.6", "typing-extensions installed 4.1, lock 4.0"
    ]
    assert doctor.normalize("Typing_Extensions") == doctor.normalize("typing.extensions")


def test_doctor_names_a_busy_port_and_a_modified_model(tmp_path):
    weights = tmp_path / "m.gguf"
    weights.write_bytes(b"GGUF" + bytes(1000))
    catalog = tmp_path / "models.toml"
    env = {"HEARTH_MODELS_TOML": str(catalog)}
    add = subprocess.run(
        [sys.executable, "-m", "hearth", "models", "add", "m", str(weights)],
        env={**os.environ, **env}, capture_output=True, text=True,
    )
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


def test_doctor_reports_auto_context_and_refuses_what_cannot_start(free_port):
    """--max-model-len auto: the choice before a start; a budget too small for it fails."""
    ok = _lines(_doctor("--port", str(free_port), "--max-model-len", "auto").stdout)
    assert ok["context"][0] == "OK" and "max_model_len auto: 720 tokens" in ok["context"][1]
    result = _doctor("--port", str(free_port), "--max-model-len", "auto", "--max-num-seqs",
                     "1000")
    status, detail = _lines(result.stdout)["context"]
    assert result.returncode == 1 and status == "FAIL"
    assert "1000 sequences" in detail and "--max-num-seqs" in detail
