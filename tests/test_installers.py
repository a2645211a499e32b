"""The offline bundle end to end: build it from this checkout (CPU torch, the default model), then,
in a network namespace with only loopback, install it into a fresh prefix, start the command the
systemd unit runs, answer a chat completion, stop it; upgrade in place; uninstall. And tampering:
one flipped byte in a wheel or a model file, or an added wheel, and install.sh refuses, naming it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hearth.appliance.tools.doctor import normalize, parse_lock

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
MODEL_FILE = f"models/{MODEL}/SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or shutil.which("sha256sum") is None, reason="needs Linux coreutils"
)


@contextlib.contextmanager
def offline_namespace() -> Iterator[list[str]]:
    """A command prefix that runs inside a network namespace with only loopback (up).

    Named namespaces (`ip netns`) outlive one command, so a server and its client can meet on
    loopback in separate commands; `unshare -n` (or -rn unprivileged) is the fallback, where each
    command gets a fresh namespace.
    """
    name = f"hearth-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    created = os.geteuid() == 0 and subprocess.run(["ip", "netns", "add", name]).returncode == 0
    if created:
        try:
            subprocess.run(
                ["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True
            )
            yield ["ip", "netns", "exec", name]
        finally:
            subprocess.run(["ip", "netns", "del", name])
        return
    flags = "-n" if os.geteuid() == 0 else "-rn"
    if subprocess.run(["unshare", flags, "true"]).returncode != 0:
        pytest.skip("cannot create a network namespace here (needs root or user namespaces)")
    yield ["unshare", flags, "sh", "-c", 'ip link set lo up 2>/dev/null; exec "$0" "$@"']


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """The unpacked bundle, built by `hearth bundle` from this checkout."""
    out = tmp_path_factory.mktemp("bundle") / "hearth-bundle.tar"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "hearth", "bundle", "--out", str(out), "--torch", "cpu"],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(f"bundle built in {time.monotonic() - started:.0f} s")
    assert f"models:   {MODEL}" in result.stdout and "torch-2.13.0+cpu" in result.stdout
    with tarfile.open(out) as tar:
        tar.extractall(out.parent, filter="data")
    return out.parent / "hearth-bundle"


def test_bundle_holds_what_serving_needs_and_a_manifest_of_it(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert on_disk - set(manifest["files"]) == {"manifest.json"}
    assert manifest["requirements"] == ["hearth[serve]==0.1.0", "torch==2.13.0+cpu"]
    assert manifest["models"] == [MODEL] and MODEL_FILE in manifest["files"]
    wheels = {name.split("/")[1].split("-")[0].lower() for name in manifest["files"]
              if name.startswith("wheels/")}
    assert {"hearth", "torch", "fastapi", "uvicorn", "gguf", "tokenizers", "numpy"} <= wheels
    assert not wheels & {"pytest", "gradio", "transformers", "hypothesis", "triton"}
    for name in ("install.sh", "uninstall.sh", "hearth.service", "Dockerfile", "requirements.txt",
                 "requirements.lock"):
        assert name in manifest["files"]
    assert manifest["lock"] == "requirements-cpu.lock"
    assert (bundle / "requirements.lock").read_text() == (REPO / manifest["lock"]).read_text()


def test_bundle_wheels_are_the_locked_versions(bundle):
    locked = parse_lock((bundle / "requirements.lock").read_text())
    found = {}
    for wheel in (bundle / "wheels").glob("*.whl"):
        name, version = wheel.name.split("-")[:2]
        found[normalize(name)] = version
    assert found.pop("hearth") == "0.1.0"
    assert {name: (version, locked.get(name)) for name, version in found.items()
            if locked.get(name) != version} == {}
    assert found["torch"] == "2.13.0+cpu"
    assert os.access(bundle / "install.sh", os.X_OK)


def _install(prefix_cmd: list[str], bundle: Path, prefix: Path, *args: str):
    python = getattr(sys, "_base_executable", sys.executable)  # the venv's base interpreter
    command = [*prefix_cmd, "bash", str(bundle / "install.sh"), "--prefix", str(prefix),
               "--python", python, *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)


def _serve_and_chat_script(prefix: Path) -> str:
    """Run what the unit runs (EnvironmentFile + ExecStart in WorkingDirectory), ask, stop."""
    unit = prefix / "etc/systemd/system/hearth.service"
    python = prefix / "opt/hearth/venv/bin/python"
    return f"""
set -eu
test "$(ip -o link | wc -l)" = 1 || {{ echo "not offline: $(ip -o link)"; exit 3; }}
unit={unit}
exec_start=$(sed -n 's/^ExecStart=//p' "$unit")
env_file=$(sed -n 's/^EnvironmentFile=//p' "$unit")
cd "$(sed -n 's/^WorkingDirectory=//p' "$unit")"
# As systemd does: a clean environment plus the EnvironmentFile's variables.
env -i PATH=/usr/bin:/bin $(grep -v '^#' "$env_file" | grep = | tr '\\n' ' ') $exec_start \\
    > server.log 2>&1 &
pid=$!
{python} - "$env_file" <<'PY'
import json, socket, sys, time, urllib.request
lines = [line.strip() for line in open(sys.argv[1]) if "=" in line and line[0] != "#"]
env = dict(line.split("=", 1) for line in lines)
url = f"http://{{env['HEARTH_HOST']}}:{{env['HEARTH_PORT']}}"
try:
    socket.create_connection(("192.0.2.1", 80), timeout=3)
    sys.exit("reached the network")
except OSError as error:
    print("outside unreachable:", error)
deadline = time.monotonic() + 300
while True:
    try:
        urllib.request.urlopen(url + "/health", timeout=2)
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("server not healthy in 300 s")
        time.sleep(1)
question = {{"role": "user", "content": "What is the capital of France?"}}
body = {{"model": "{MODEL}", "messages": [question], "max_tokens": 16, "temperature": 0}}
request = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {{"Content-Type": "application/json"}})
print("ANSWER", urllib.request.urlopen(request, timeout=120).read().decode())
PY
kill -TERM $pid
wait $pid && echo "SERVER EXIT 0"
"""


@pytest.mark.slow  # ~3 min here: pip installs torch (84 s), the server starts and answers (60 s)
def test_offline_install_serve_upgrade_uninstall(bundle, tmp_path):
    prefix = tmp_path / "root"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with offline_namespace() as offline:
        started = time.monotonic()
        first = _install(offline, bundle, prefix, "--port", str(port))
        assert first.returncode == 0, first.stdout + first.stderr
        print(f"install: {time.monotonic() - started:.0f} s")
        assert "all files match manifest.json" in first.stdout
        assert "systemd is not running here" in first.stdout
        assert str(prefix / "opt/hearth/bin/hearth-serve") in first.stdout
        assert f"http://127.0.0.1:{port}/" in first.stdout
        env_file = prefix / "etc/hearth/hearth.env"
        assert f"HEARTH_PORT={port}" in env_file.read_text()
        keys_file = prefix / "etc/hearth/keys.toml"  # empty, 0640: `hearth keys` keeps the mode
        assert keys_file.stat().st_mode & 0o777 == 0o640
        added = subprocess.run([str(prefix / "opt/hearth/venv/bin/hearth"), "keys", "--file",
                                str(keys_file), "add", "kiosk"], capture_output=True, text=True)
        assert added.returncode == 0, added.stdout + added.stderr
        assert keys_file.stat().st_mode & 0o777 == 0o640 and "kiosk" in keys_file.read_text()
        unit = (prefix / "etc/systemd/system/hearth.service").read_text()
        assert f"ExecStart={prefix}/opt/hearth/venv/bin/hearth serve" in unit
        assert f"ReadWritePaths={prefix}/var/lib/hearth" in unit

        started = time.monotonic()
        script = tmp_path / "serve.sh"
        script.write_text(_serve_and_chat_script(prefix))
        served = subprocess.run([*offline, "bash", str(script)], capture_output=True, text=True,
                                timeout=600)
        log = (prefix / "var/lib/hearth/server.log").read_text(errors="replace")
        assert served.returncode == 0, served.stdout + served.stderr + log[-3000:]
        print(f"serve + chat: {time.monotonic() - started:.0f} s")
        assert "outside unreachable" in served.stdout
        answer = json.loads(served.stdout.split("ANSWER ", 1)[1].splitlines()[0])
        assert answer["model"] == MODEL
        assert "Paris" in answer["choices"][0]["message"]["content"]
        assert "SERVER EXIT 0" in served.stdout

        # Upgrade in place: the operator's config edits and extra models are kept.
        env_file.write_text(env_file.read_text() + "HEARTH_MAX_NUM_SEQS=8\n")
        extra = prefix / "var/lib/hearth/models/extra.gguf"
        extra.write_bytes(b"GGUF operator model")
        hearth = prefix / "opt/hearth/venv/bin/hearth"
        catalog = prefix / "var/lib/hearth/models.toml"
        subprocess.run([str(hearth), "models", "--catalog", str(catalog), "add", "extra",
                        str(extra)], check=True, capture_output=True)
        started = time.monotonic()
        again = _install(offline, bundle, prefix, "--port", "1")
        assert again.returncode == 0, again.stdout + again.stderr
        print(f"upgrade: {time.monotonic() - started:.0f} s")
        assert "upgrading" in again.stdout and "keeping" in again.stdout
        assert "HEARTH_MAX_NUM_SEQS=8" in env_file.read_text()
        assert f"HEARTH_PORT={port}" in env_file.read_text()
        # bin/hearth reads hearth.env as the unit does: the installed catalogue, the port.
        wrapper = str(prefix / "opt/hearth/bin/hearth")
        listing = subprocess.run([*offline, wrapper, "models", "list"], capture_output=True,
                                 text=True, check=True).stdout
        assert f"* {MODEL}" in listing and "extra" in listing
        doctor = subprocess.run([*offline, wrapper, "doctor"], capture_output=True, text=True)
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert f"OK    port       127.0.0.1:{port} is free" in doctor.stdout
        assert f"OK {MODEL}: 1 file(s) match" in doctor.stdout
        assert str(prefix / "var/lib/hearth/models") in doctor.stdout
        # install.sh installed exactly the lock's versions (the wheel carries the lock files).
        assert "OK    lock       installed versions match requirements-cpu.lock" in doctor.stdout

    removed = subprocess.run(["bash", str(bundle / "uninstall.sh"), "--prefix", str(prefix)],
                             capture_output=True, text=True)
    assert removed.returncode == 0, removed.stderr
    assert not (prefix / "opt/hearth").exists()
    assert not (prefix / "etc/systemd/system/hearth.service").exists()
    assert env_file.exists() and catalog.exists()


@contextlib.contextmanager
def _flipped(path: Path, offset: int) -> Iterator[None]:
    original = path.read_bytes()
    data = bytearray(original)
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    try:
        yield
    finally:
        path.write_bytes(original)


@pytest.mark.parametrize("target", ["wheel", "model"])
def test_install_refuses_a_flipped_byte_naming_the_file(bundle, tmp_path, target):
    if target == "wheel":
        path = next((bundle / "wheels").glob("hearth-*.whl"))
    else:
        path = bundle / MODEL_FILE
    relative = path.relative_to(bundle).as_posix()
    with _flipped(path, offset=path.stat().st_size // 2):
        result = _install([], bundle, tmp_path / "root")
    assert result.returncode == 1
    assert f"refusing to install: {relative} do(es) not match manifest.json" in result.stderr
    assert not (tmp_path / "root" / "opt").exists()  # refused before installing anything


def test_install_refuses_a_wheel_added_to_the_bundle(bundle, tmp_path):
    intruder = bundle / "wheels" / "evil-1.0-py3-none-any.whl"
    intruder.write_bytes(b"PK")
    try:
        result = _install([], bundle, tmp_path / "root")
    finally:
        intruder.unlink()
    assert result.returncode == 1
    assert "not in manifest.json" in result.stderr and "wheels/evil-1.0" in result.stderr
