"""`hearth doctor`: is this machine ready to serve? One line per check, OK or what to fix.

Checks: Python, the serving packages, torch, the installed versions against the lock file, the CPU
(cores, native bf16: whether the CPU fast path pays off), the NVIDIA driver / CUDA / GPUs (NVML),
the model's files and their sha256, memory and disk for that model, and whether the port is free.
The model, host and port come from the same flags and HEARTH_* variables as `hearth serve`. Exit
status 1 when a check fails; a warning (no GPU, a version other than the lock's, estimate close to
the limit) does not fail.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.resources
import importlib.util
import os
import re
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from hearth import __version__
from hearth.appliance.settings import Settings, parse_max_model_len, settings_from

_GIB = 1 << 30
_PYTHON_MIN = (3, 10)
# The lock files (`make lock`), shipped inside the hearth package: one per torch build.
LOCK_FILES = {"cpu": "requirements-cpu.lock", "cuda": "requirements-cuda.lock"}
_SHOWN_DIFFERENCES = 3


@dataclass(frozen=True)
class Check:
    status: str  # "OK" | "WARN" | "FAIL"
    name: str
    detail: str


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "doctor", help="check this machine: Python, GPU, memory, disk, port, model checksums",
        description=__doc__.split("\n\n")[1],
    )
    flags = (("--model", str), ("--host", str), ("--port", int), ("--device", str),
             ("--dtype", str), ("--max-model-len", parse_max_model_len), ("--max-num-seqs", int),
             ("--kv-cache-gib", float), ("--kv-cache-dtype", str))
    for flag, kind in flags:
        env = "HEARTH_" + flag[2:].upper().replace("-", "_")
        parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=f"[env {env}]")


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from(args, os.environ)
    except ValueError as error:
        print(f"FAIL settings: {error}")
        return 1
    checks = run_checks(settings)
    width = max(len(c.name) for c in checks)
    for check in checks:
        print(f"{check.status:<4}  {check.name:<{width}}  {check.detail}")
    failed = sum(c.status == "FAIL" for c in checks)
    print(f"{failed} check(s) failed" if failed else "ready to serve")
    return 1 if failed else 0


def run_checks(settings: Settings) -> list[Check]:
    checks = [_python(), _serving_packages(), _torch(), _lock(), _cpu(settings), _gpus()]
    weight_bytes, model_checks = _model(settings)
    checks += model_checks
    checks += [_memory(weight_bytes), _context(settings), _disk(),
               _port(settings.host, settings.port)]
    return checks


def _python() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info[:2] < _PYTHON_MIN:
        return Check("FAIL", "python", f"{version}: Hearth needs Python 3.10 or newer")
    return Check("OK", "python", f"{version} ({sys.executable})")


def _serving_packages() -> Check:
    missing = [m for m in ("fastapi", "uvicorn", "pydantic", "prometheus_client", "psutil")
               if importlib.util.find_spec(m) is None]
    if missing:
        return Check(
            "FAIL", "packages", f"missing {', '.join(missing)}: pip install 'hearth[serve]'"
        )
    return Check("OK", "packages", f"hearth {__version__}, fastapi, uvicorn, pydantic")


def _torch() -> Check:
    try:
        import torch
    except ImportError as error:
        return Check("FAIL", "torch", f"cannot import torch ({error}): install the bundle's wheels")
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    return Check("OK", "torch", f"{torch.__version__} ({cuda}), {torch.get_num_threads()} threads")


def _lock() -> Check:
    """Installed versions against the lock of the installed torch build: drift is a warning."""
    name = LOCK_FILES[lock_variant()]
    try:
        locked = read_lock(name)
    except FileNotFoundError:
        return Check("WARN", "lock", f"{name} is not in the hearth package: reinstall Hearth")
    installed = installed_versions()
    differences = lock_differences(locked, installed)
    if not differences:
        checked = len(locked.keys() & installed.keys())
        return Check("OK", "lock", f"installed versions match {name} ({checked} packages)")
    shown = "; ".join(differences[:_SHOWN_DIFFERENCES])
    more = len(differences) - _SHOWN_DIFFERENCES
    shown += f"; and {more} more" if more > 0 else ""
    return Check("WARN", "lock", f"{len(differences)} differ from {name}: {shown}")


def lock_variant() -> str:
    """"cpu" for a +cpu torch build (or no torch), else "cuda"."""
    try:
        torch = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "cpu"
    return "cpu" if torch.endswith("+cpu") else "cuda"


def lock_text(name: str) -> str:
    """A lock file of the hearth package: the wheel ships them, a checkout has them at its root."""
    return importlib.resources.files("hearth").joinpath(name).read_text()


def read_lock(name: str) -> dict[str, str]:
    """Normalized name → pinned version, from a lock file of the hearth package."""
    return parse_lock(lock_text(name))


def parse_lock(text: str) -> dict[str, str]:
    """The `name==version` lines of a requirements file (comments and annotations skipped)."""
    pins = {}
    for line in text.splitlines():
        name, sep, version = line.partition("==")
        if sep and line[:1].isalnum():
            pins[normalize(name)] = version.split(";")[0].strip()
    return pins


def installed_versions() -> dict[str, str]:
    """Normalized name → version of every distribution this interpreter imports from."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        if dist.metadata["Name"]:  # a broken install can leave metadata without one
            found.setdefault(normalize(dist.metadata["Name"]), dist.version)  # the first wins
    return found


def lock_differences(locked: dict[str, str], installed: dict[str, str]) -> list[str]:
    """`name installed X, lock Y` for each locked package installed at another version."""
    return [f"{name} installed {installed[name]}, lock {version}"
            for name, version in sorted(locked.items())
            if name in installed and installed[name] != version]


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def _cpu(settings: Settings) -> Check:
    """Cores, and which fast path the CPU takes (engine/cpu_precision.py): bf16 + the int4 GEMV
    with AVX-512 BF16 or AMX; a float32 model with kept blocks with AVX2 + FMA (the native CPU
    kernels where a C compiler is found, else the int4 GEMV on bf16 inputs); none below that.
    That is what `--dtype auto` picks there."""
    from hearth.engine.cpu_precision import BF16_FLAGS, cpu_flags, cpu_has_fast_int4_gemv
    from hearth.kernels import cpu_native

    native = sorted(BF16_FLAGS & cpu_flags())
    fast = cpu_has_fast_int4_gemv()
    detail = f"{os.cpu_count()} cores, " + (
        f"native bf16 ({', '.join(native)})" if native
        else "AVX2, no native bf16" if fast else "no AVX2: float32 only on CPU")
    if native and settings.dtype == "auto":
        detail += ("; --dtype auto runs a Q4_0/Q4_1 GGUF on it as --dtype bfloat16 "
                   "--gguf-keep-quantized (int4 GEMV)")
    elif fast and settings.dtype == "auto":
        cc = cpu_native.compiler()
        detail += ("; --dtype auto runs a Q4_0/Q4_1 GGUF on it in float32 with its blocks kept, "
                   + (f"on the native CPU kernels (built with {cc})" if cc else
                      "on the native CPU kernels (the wheel's prebuilt AVX2 build; no C "
                      "compiler here)" if cpu_native.prebuilt_fits() else
                      "on the int4 GEMV with bf16 inputs: no C compiler for the native CPU "
                      "kernels (install gcc: about 3x the decode speed)"))
    elif fast and settings.dtype == "float32" and not settings.gguf_keep_quantized:
        detail += "; without a GPU, --dtype auto decodes a Q4_0/Q4_1 GGUF ~1.5-2x faster"
    return Check("OK", "cpu", detail)


def _gpus() -> Check:
    try:
        import pynvml
    except ImportError:
        return Check("WARN", "gpu", "nvidia-ml-py is not installed: cannot look for GPUs")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        return Check("WARN", "gpu", f"no NVIDIA GPU (NVML: {error}): Hearth will run on the CPU")
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()
        cards = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            cards.append(f"{name} ({memory.free / _GIB:.0f}/{memory.total / _GIB:.0f} GiB free)")
    finally:
        pynvml.nvmlShutdown()
    if not cards:
        return Check("WARN", "gpu", f"driver {driver} but no GPU visible: running on the CPU")
    detail = f"driver {driver}, CUDA {cuda // 1000}.{cuda % 1000 // 10}: {'; '.join(cards)}"
    return Check(_cuda_torch_status(), "gpu", detail)


def _cuda_torch_status() -> str:
    try:
        import torch
    except ImportError:
        return "WARN"
    return "OK" if torch.cuda.is_available() else "WARN"  # a CPU torch cannot use the GPUs


def _model(settings: Settings) -> tuple[int, list[Check]]:
    """The chosen model: where its files are, their sha256, and about how much memory its weights
    take (a quantized GGUF is dequantized to float: budget 4x the file)."""
    from hearth.appliance.tools.models import check_model
    from hearth.engine.catalog import load_catalog, model_files, resolve_model, verify

    try:
        catalog = load_catalog()
        resolved = resolve_model(settings.model, catalog)
        size = sum(p.stat().st_size for p in model_files(resolved))
    except ValueError as error:
        return 0, [Check("FAIL", "model", str(error))]
    weight_bytes = size * (4 if resolved.format == "gguf" else 1)
    found = Check("OK", "model", f"{resolved.name}: {resolved.path} ({size / 1e6:.0f} MB), "
                                 f"catalogue {catalog.source}")
    if resolved.name in catalog.models:
        ok, line = check_model(catalog, resolved.name)
        return weight_bytes, [found, Check("OK" if ok else "FAIL", "checksums", line)]
    verify(resolved)
    return weight_bytes, [
        found,
        Check("WARN", "checksums", "a path, not a catalogue entry: no sha256"),
    ]


def _memory(weight_bytes: int) -> Check:
    import psutil

    from hearth.engine.config import DEFAULT_CPU_KV_CACHE_GIB

    available = psutil.virtual_memory().available
    need = weight_bytes + (DEFAULT_CPU_KV_CACHE_GIB + 1) * _GIB  # + KV cache and the runtime
    detail = f"{available / _GIB:.1f} GiB available, the model needs about {need / _GIB:.1f} GiB"
    if available < need:
        return Check("FAIL", "memory", detail + ": free memory or pick a smaller model")
    return Check("OK", "memory", detail)


def _context(settings: Settings) -> Check:
    """The KV budget and the context it gives; --max-model-len auto's choice (context_check.py)."""
    from hearth.appliance.tools.context_check import context_report

    report = context_report(settings)
    return Check(report.status, "context", report.detail)


def _disk() -> Check:
    from hearth.engine.catalog import catalog_path

    place = catalog_path()
    directory = place.parent if place is not None else Path.cwd()
    free = shutil.disk_usage(directory).free
    detail = f"{free / _GIB:.1f} GiB free in {directory}"
    if free < _GIB:
        return Check("FAIL", "disk", detail + ": Hearth needs 1 GiB for logs and kernel caches")
    return Check("OK", "disk", detail)


def _port(host: str, port: int) -> Check:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as `hearth serve` binds
        try:
            sock.bind((host, port))
        except OSError as error:
            if _hearth_answers(host, port):
                return Check("WARN", "port", f"{host}:{port} is in use by a running Hearth "
                             "(its /health is OK)")
            return Check("FAIL", "port", f"{host}:{port} is not free ({error.strerror}): stop "
                         "what uses it or choose another with --port / HEARTH_PORT")
    return Check("OK", "port", f"{host}:{port} is free")


def _hearth_answers(host: str, port: int) -> bool:
    import json
    import urllib.request

    shown = f"[{host}]" if ":" in host else ("127.0.0.1" if host == "0.0.0.0" else host)
    try:
        with urllib.request.urlopen(f"http://{shown}:{port}/health", timeout=2) as response:
            return json.load(response).get("status") == "ok"
    except (OSError, ValueError):
        return False
