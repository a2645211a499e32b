"""Native CPU kernels for GGUF Q4_0 / Q4_1 weights (kernels/cpu_native.c), loaded with ctypes.

Why native code: at batch 1 on a CPU the default model's decode step is about 1,600 small torch
ops, and their dispatch cost more than the arithmetic (docs/benchmarks.md). The C file runs a
decode step of a Llama-family model (a token for each of up to GEMV_MAX_ROWS sequences) in one
call, and reads llama.cpp's blocks in place with
activations rounded to int16 per block of 32 (a relative error below 2e-5; torch's int4 GEMV
needs bf16 inputs, 4e-3).

The library is compiled on first use with the system C compiler (`$CC`, else `cc` / `gcc`; about
1 s) into a cache keyed by the source, the compiler and the CPU's flags (`-march=native`), then
reused: `$HEARTH_NATIVE_CACHE`, else `$XDG_CACHE_HOME/hearth/native` or `~/.cache/hearth/native`,
else a folder under the system temp dir. Where no compiler is found (a python:3.11-slim container,
a minimal air-gapped host), the wheel's prebuilt AVX2 build (`PREBUILT`, compiled by `hearth
bundle` with `build_prebuilt`) is loaded on a CPU with AVX2 + FMA + F16C when it was compiled from
this very source. Otherwise, or with `HEARTH_NATIVE_CPU=0`, `load()` returns None and the engine
keeps its torch paths. Every kernel has a torch reference in the tests
(tests/test_cpu_native.py)."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_native.c")
QTYPES = {"Q4_0": 0, "Q4_1": 1}
BLOCK = 32
ROW_BLOCK_BYTES = 20  # a native row's bytes a block: float16 d and m, 16 bytes of nibbles
# up to this many rows the GEMV reads the blocks in place; more (prompts) multiply the layer
# dequantized into float32, where compute rather than weight bytes dominates
GEMV_MAX_ROWS = 32
# -ffp-contract=off: a row computes the same bits through every entry point (batch invariance)
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC",
          "-std=gnu11"]
# The prebuilt library: x86-64 with the instructions the AVX2 kernels use, nothing newer, so that
# every such CPU runs it (a build on the machine itself may use more: -march=native).
PREBUILT = SOURCE.with_name("cpu_native_prebuilt.so")
PREBUILT_CPU_FLAGS = frozenset({"avx2", "fma", "f16c"})
_PREBUILT_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off", "-shared",
                   "-fPIC", "-std=gnu11"]

_lock = threading.Lock()
_state: dict[str, object] = {}


class Layer(ctypes.Structure):
    """hearth_layer in cpu_native.c: one decoder layer's weights and KV cache."""

    _fields_ = [("qkv", ctypes.c_void_p), ("o", ctypes.c_void_p), ("gate_up", ctypes.c_void_p),
                ("down", ctypes.c_void_p), ("input_norm", ctypes.c_void_p),
                ("post_norm", ctypes.c_void_p),
                ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p)]


class Dims(ctypes.Structure):
    """hearth_dims in cpu_native.c."""

    _fields_ = [("hidden", ctypes.c_int64), ("intermediate", ctypes.c_int64),
                ("num_heads", ctypes.c_int64), ("num_kv_heads", ctypes.c_int64),
                ("head_dim", ctypes.c_int64), ("block_size", ctypes.c_int64),
                ("kv_half", ctypes.c_int64), ("eps", ctypes.c_float), ("scale", ctypes.c_float)]


def load() -> ctypes.CDLL | None:
    """The compiled library (built once per process, cached on disk), or None where it cannot
    be built; the reason is logged once."""
    with _lock:
        if "lib" not in _state:
            _state["lib"] = _load()
        return _state["lib"]  # type: ignore[return-value]


def available() -> bool:
    return load() is not None


def compiler() -> str | None:
    """The C compiler the library is built with: `$CC`, else `cc` or `gcc` on the PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _load() -> ctypes.CDLL | None:
    if os.environ.get("HEARTH_NATIVE_CPU", "1") == "0":
        logger.info("native CPU kernels off (HEARTH_NATIVE_CPU=0)")
        return None
    cc = compiler()
    lib, why = None, "no C compiler (cc / gcc)"
    if cc is not None:
        try:
            lib = ctypes.CDLL(str(_build(cc)))
        except (OSError, subprocess.SubprocessError) as e:
            why = str(e)
    if lib is None:
        lib = _prebuilt()
        if lib is not None:
            logger.info("native CPU kernels: the prebuilt AVX2 build %s (%s)", PREBUILT, why)
    if lib is None:
        logger.warning("native CPU kernels unavailable (%s); decode on the CPU keeps torch's "
                       "kernels%s", why, " (install gcc: about 3x the decode speed)"
                       if cc is None else "")
        return None
    _declare(lib)
    lib.hearth_set_threads(torch.get_num_threads())
    return lib


def _source_sha256() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()


def prebuilt_fits() -> bool:
    """PREBUILT is here and this CPU runs it (x86-64 with AVX2, FMA and F16C)."""
    flags = set(_cpu_flags().decode(errors="replace").partition(":")[2].split())
    return (PREBUILT.is_file() and platform.machine() in ("x86_64", "AMD64")
            and PREBUILT_CPU_FLAGS <= flags)


def _prebuilt() -> ctypes.CDLL | None:
    """PREBUILT where this CPU runs it and it was compiled from this source, else None."""
    if not prebuilt_fits():
        return None
    try:
        lib = ctypes.CDLL(str(PREBUILT))
        lib.hearth_native_source.restype = ctypes.c_char_p
        built_from = lib.hearth_native_source().decode()
    except (OSError, AttributeError) as e:
        logger.warning("the prebuilt native CPU kernels %s do not load: %s", PREBUILT, e)
        return None
    if built_from != _source_sha256():
        logger.warning("the prebuilt native CPU kernels %s were built from another cpu_native.c "
                       "(sha256 %s); not used", PREBUILT, built_from[:12] or "unknown")
        return None
    return lib


def build_prebuilt(out: Path, cc: str | None = None) -> Path:
    """Compile the prebuilt AVX2 library into `out` (`hearth bundle` puts it in the wheel, for
    hosts with no C compiler). ValueError off x86-64 or without a compiler; SubprocessError if
    the compiler fails."""
    if platform.machine() not in ("x86_64", "AMD64"):
        raise ValueError(f"the prebuilt native CPU kernels are x86-64 AVX2 code; this machine is "
                         f"{platform.machine()}")
    cc = cc or compiler()
    if cc is None:
        raise ValueError("no C compiler (cc / gcc) to build the prebuilt native CPU kernels")
    proc = subprocess.run([cc, *_PREBUILT_FLAGS, f'-DHEARTH_SOURCE_SHA256="{_source_sha256()}"',
                           "-o", str(out), str(SOURCE), "-lm"],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise subprocess.SubprocessError(
            f"{cc} failed: {proc.stderr.strip()[-400:] or proc.returncode}")
    return out


def _build(cc: str) -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(_FLAGS).encode(),
                                     platform.machine().encode(), _cpu_flags()])).hexdigest()
    for folder in _cache_dirs():
        path = folder / f"cpu_native-{key[:20]}.so"
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not _private(folder):
                continue  # a library another user could have written is never loaded
            if path.exists():
                return path
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
            os.close(fd)
        except OSError:
            continue  # not writable: the next candidate
        try:
            proc = subprocess.run([cc, *_FLAGS, "-o", tmp, str(SOURCE), "-lm"],
                                  capture_output=True, text=True, timeout=120)
            if proc.returncode != 0:
                raise subprocess.SubprocessError(
                    f"{cc} failed: {proc.stderr.strip()[-400:] or proc.returncode}")
            os.replace(tmp, path)  # atomic: another process may build the same file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        logger.info("native CPU kernels built with %s into %s", cc, path)
        return path
    raise OSError("no writable cache folder for the native CPU kernels")


def _private(folder: Path) -> bool:
    """Owned by this user and writable by no one else (the temp-dir fallback is shared)."""
    st = folder.stat()
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _cache_dirs() -> list[Path]:
    if os.environ.get("HEARTH_NATIVE_CACHE"):
        return [Path(os.environ["HEARTH_NATIVE_CACHE"])]
    xdg = os.environ.get("XDG_CACHE_HOME")
    home = Path(xdg) if xdg else Path.home() / ".cache"
    return [home / "hearth" / "native",
            Path(tempfile.gettempdir()) / f"hearth-native-{os.getuid()}"]


def _cpu_flags() -> bytes:
    """The CPU's feature flags (-march=native builds for them: a copied cache on another CPU
    must not load)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.encode()
    except OSError:
        pass
    return platform.processor().encode()


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.hearth_set_threads.argtypes = [i32]
    lib.hearth_q4_repack.argtypes = [i32, p, i64, i64, p]
    lib.hearth_q4_repack.restype = i64
    lib.hearth_q4_matmul.argtypes = [p, i64, i64, p, i64, p]
    lib.hearth_f32_to_f16.argtypes = [p, i64, p]
    lib.hearth_q4_dequantize.argtypes = [p, i64, i64, p]
    lib.hearth_i8_matmul.argtypes = [p, p, i64, i64, p, i64, p]
    lib.hearth_i8_logits.argtypes = [p, p, i64, i64, p, i64, p, i64]
    lib.hearth_decode.argtypes = [ctypes.POINTER(Layer), i64, ctypes.POINTER(Dims), p, p, p, p,
                                  p, i64, p, p, i64]
    lib.hearth_decode.restype = i32


def supported(qtype: str, in_features: int) -> bool:
    return qtype in QTYPES and in_features % BLOCK == 0


def q4_repack(raw: torch.Tensor, qtype: str, in_features: int) -> torch.Tensor:
    """(N, row_bytes) raw Q4_0 / Q4_1 rows → (N, 20 * K / 32) native rows: float16 d and m of
    every block, then the nibbles (the layout the kernels read; cpu_native.c)."""
    n = raw.shape[0]
    out = torch.empty(n, in_features // BLOCK * ROW_BLOCK_BYTES, dtype=torch.uint8)
    bad = load().hearth_q4_repack(QTYPES[qtype], raw.contiguous().data_ptr(), n, in_features,
                                  out.data_ptr())
    if bad:
        raise ValueError(f"{bad} Q4_0 blocks have a scale above 8188, which the native CPU "
                         "kernels cannot hold; set HEARTH_NATIVE_CPU=0 to load this file")
    return out


def q4_matmul(x: torch.Tensor, rows: torch.Tensor, out_features: int) -> torch.Tensor:
    """x (M, K) float32 @ W^T → (M, N) float32, W in native rows (q4_repack); x rounded to int16
    per block of 32 (see cpu_native.c). A row's result does not depend on the others."""
    m, k = x.shape
    x = x.contiguous()
    y = torch.empty(m, out_features, dtype=torch.float32)
    load().hearth_q4_matmul(rows.data_ptr(), out_features, k, x.data_ptr(), m, y.data_ptr())
    return y


def q4_dequantize(rows: torch.Tensor, in_features: int) -> torch.Tensor:
    """Native rows as float32 (N, K), rounded as gguf_blocks.dequantize rounds the file's."""
    n = rows.shape[0]
    out = torch.empty(n, in_features, dtype=torch.float32)
    load().hearth_q4_dequantize(rows.data_ptr(), n, in_features, out.data_ptr())
    return out


def i8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) float32 @ (weight * scales[:, None])^T → (M, N) float32, weight (N, K) int8 and
    scales (N,) float32, with x rounded to int8 per block of 32 (K a multiple of 32): the LM
    head's approximate logits (engine/quantization/cpu_int8.py refines the top ones)."""
    m, k = x.shape
    n = weight.shape[0]
    x = x.float().contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    load().hearth_i8_matmul(weight.data_ptr(), scales.data_ptr(), n, k, x.data_ptr(), m,
                            y.data_ptr())
    return y


def i8_logits(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
              refined: int) -> torch.Tensor:
    """i8_matmul's logits with each row's top `refined` (at most 16) recomputed in float32 from
    the same int8 rows: engine/quantization/cpu_int8.py's `logits` in one native call."""
    m, k = x.shape
    n = weight.shape[0]
    x = x.float().contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    load().hearth_i8_logits(weight.data_ptr(), scales.data_ptr(), n, k, x.data_ptr(), m,
                            y.data_ptr(), refined)
    return y
