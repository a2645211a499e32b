"""`hearth bundle`: one tar with all an air-gapped machine needs to install and serve Hearth.

Run it in a source checkout on a connected machine. The archive holds:

    hearth-bundle/
      manifest.json       the sha256 and size of every other file, the target, the models
      install.sh  uninstall.sh  hearth.service  Dockerfile      (copied from installers/)
      requirements.txt    what install.sh asks pip for: hearth[serve] and the lock's torch
      requirements.lock   the lock file of the torch build (requirements-cpu.lock or -cuda.lock):
                          the constraints pip downloads with here and installs with there
      wheels/             Hearth's wheel, built from this checkout, and every dependency at the
                          lock's version, for the target's Python and platform (`pip download
                          --only-binary`)
      models/models.toml  a catalogue of the bundled models, paths relative to it
      models/NAME/...     their files (checked against the local catalogue's sha256 first)

Only what serving needs travels: no test tools, and no gradio unless `--ui` (it adds ~100 MB).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from hearth import __version__
from hearth.appliance.tools.doctor import LOCK_FILES, lock_text, read_lock

TOP = "hearth-bundle"
LOCK_IN_BUNDLE = "requirements.lock"
_REPO = Path(__file__).resolve().parents[2]
_INSTALLERS = ("install.sh", "uninstall.sh", "hearth.service", "Dockerfile")
_NOT_IN_WHEEL = (".*", "build", "dist", "*.egg-info", "__pycache__", "tests", "bench", "*.tar")


@dataclass(frozen=True)
class BundleOptions:
    out: Path
    models: tuple[str, ...]  # catalogue names; empty: the default model
    torch: str  # "cpu" | "cuda"
    python_version: str  # the target's, e.g. "3.11"
    platforms: tuple[str, ...]  # wheel platform tags the target accepts
    ui: bool = False
    torch_index: str | None = None  # an extra index for torch, e.g. PyTorch's CPU wheels


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bundle",
        help="build an offline install bundle (wheels, models, sha256 manifest, installer)",
        description=__doc__.split("\n\n")[0],
    )
    host = f"{sys.version_info.major}.{sys.version_info.minor}"
    parser.add_argument("--out", type=Path, default=Path("hearth-bundle.tar"), metavar="FILE")
    parser.add_argument("--models", nargs="+", default=[], metavar="NAME",
                        help="catalogue names to include (default: the default model)")
    parser.add_argument("--torch", choices=("cpu", "cuda"), default="cpu",
                        help="torch build for the target (its lock file's versions)")
    parser.add_argument("--torch-index", metavar="URL",
                        help="extra package index for torch, e.g. https://download.pytorch.org"
                        "/whl/cpu where pip's index has only the CUDA build")
    parser.add_argument("--python-version", default=host, metavar="X.Y",
                        help=f"the target's Python (default: this one, {host})")
    parser.add_argument("--platform", action="append", dest="platforms", metavar="TAG",
                        help="wheel platform tag the target accepts, repeatable "
                        "(default: manylinux tags for this machine's architecture)")
    parser.add_argument("--ui", action="store_true", help="include the browser UI (gradio)")


def run(args: argparse.Namespace) -> int:
    options = BundleOptions(
        out=args.out, models=tuple(args.models), torch=args.torch,
        python_version=args.python_version,
        platforms=tuple(args.platforms or default_platforms()), ui=args.ui,
        torch_index=args.torch_index,
    )
    try:
        build_bundle(options)
    except (ValueError, subprocess.CalledProcessError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def default_platforms(machine: str | None = None) -> list[str]:
    """glibc 2.31 and up (Debian 11, Ubuntu 20.04, RHEL 9): llguidance ships manylinux_2_31
    wheels only, so that is the oldest target a bundle with grammars can serve."""
    arch = machine or platform.machine()
    return [f"manylinux_2_{v}_{arch}" for v in (31, 28, 27, 17, 12, 5)] + [
        f"manylinux2014_{arch}", f"manylinux1_{arch}"
    ]


def requirements(options: BundleOptions) -> list[str]:
    extras = "serve,ui" if options.ui else "serve"
    torch = read_lock(LOCK_FILES[options.torch])["torch"]
    return [f"hearth[{extras}]=={__version__}", f"torch=={torch}"]


def build_bundle(options: BundleOptions) -> Path:
    if not (_REPO / "pyproject.toml").is_file():
        raise ValueError("hearth bundle builds Hearth's wheel from a source checkout: run it there")
    options.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=options.out.parent, prefix=".hearth-bundle-") as tmp:
        stage = Path(tmp) / TOP
        (stage / "wheels").mkdir(parents=True)
        models = _copy_models(options.models, stage / "models")
        _step("building Hearth's wheel")
        wheel = build_wheel(stage / "wheels", Path(tmp) / "src")
        lock = stage / LOCK_IN_BUNDLE
        lock.write_text(lock_text(LOCK_FILES[options.torch]))
        _step(f"downloading dependencies for CPython {options.python_version} ({lock.name})")
        _download(options, wheel, lock, stage / "wheels")
        _copy_installers(stage, options)
        manifest = _write_manifest(stage, options, models)
        _write_tar(stage, options.out)
    _print_summary(options.out, manifest)
    return options.out


def _copy_models(names: tuple[str, ...], dest: Path) -> list[str]:
    from hearth.engine.catalog import (
        Catalog,
        load_catalog,
        model_files,
        resolve_model,
        save_catalog,
    )
    from hearth.engine.catalog import verify as verify_files

    catalog = load_catalog()
    chosen = list(names) or [catalog.default]
    specs = {}
    for name in chosen:
        if name not in catalog.models:
            raise ValueError(f"no model {name!r} in {catalog.source}: {', '.join(catalog.models)}")
        resolved = resolve_model(name, catalog)
        verify_files(resolved)  # a bundle never carries a corrupt model
        files = model_files(resolved)
        base = resolved.path if resolved.format == "hf" else resolved.path.parent
        target = dest / name
        _copy_with_progress([(f, target / f.relative_to(base)) for f in files], f"model {name}")
        path = target if resolved.format == "hf" else target / resolved.path.name
        specs[name] = _bundled_spec(catalog.models[name], resolved.format, path, target)
    default = catalog.default if catalog.default in specs else chosen[0]
    save_catalog(Catalog(default, specs, "bundle"), dest / "models.toml")
    return chosen


def _bundled_spec(spec, fmt: str, path: Path, target: Path):
    """The entry as installed: the files now sit under models/NAME/, whatever the source was."""
    hashes = spec.sha256 or _hash_tree(target)
    return replace(spec, source=fmt, path=path, package=None, file=None, sha256=hashes)


def _hash_tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): _sha256(p) for p in sorted(root.rglob("*"))
            if p.is_file()}


def build_wheel(wheels: Path, src: Path) -> Path:
    """Hearth's wheel, built into `wheels` from a copy of the checkout made at `src`, with the
    prebuilt native CPU kernels in it where this machine can build them."""
    shutil.copytree(_REPO, src, ignore=shutil.ignore_patterns(*_NOT_IN_WHEEL))
    _prebuild_native(src)
    # Building with the setuptools at hand needs no index; otherwise pip fetches one.
    isolation = ["--no-build-isolation"] if _has_setuptools() else []
    _pip("wheel", "--no-deps", *isolation, "-w", str(wheels), str(src))
    return next(wheels.glob("hearth-*.whl"))


def _prebuild_native(src: Path) -> None:
    """kernels/cpu_native_prebuilt.so in the copy: the AVX2 build of the native CPU kernels that
    hosts without a C compiler load (the container image's python:3.11-slim has none). Off
    x86-64 or without a compiler here, the wheel goes without it and such hosts keep torch's
    kernels."""
    from hearth.kernels import cpu_native

    out = src / "kernels" / cpu_native.PREBUILT.name
    try:
        cpu_native.build_prebuilt(out)
    except (ValueError, OSError, subprocess.SubprocessError) as e:
        print(f"  no prebuilt native CPU kernels in the wheel ({e}): hosts without a C compiler "
              "will keep torch's kernels", flush=True)
        return
    print(f"  prebuilt native CPU kernels (AVX2) in the wheel: {out.name}", flush=True)


def _has_setuptools() -> bool:
    import importlib.util

    return importlib.util.find_spec("setuptools") is not None


def _download(options: BundleOptions, wheel: Path, lock: Path, wheels: Path) -> None:
    target = ["--only-binary=:all:", "--python-version", options.python_version,
              "--implementation", "cp", "--abi", f"cp{options.python_version.replace('.', '')}",
              "--abi", "abi3", "--abi", "none"]
    for tag in options.platforms:
        target += ["--platform", tag]
    index = ["--extra-index-url", options.torch_index] if options.torch_index else []
    extras = requirements(options)[0].split("==")[0].removeprefix("hearth")
    _pip("download", "-d", str(wheels), *target, *index, "-c", str(lock), f"{wheel}{extras}",
         requirements(options)[1])
    torch_wheels = [w.name for w in wheels.glob("torch-*.whl")]
    if options.torch == "cuda" and any("+cpu" in name for name in torch_wheels):
        raise ValueError(
            f"pip found the CPU build of torch ({torch_wheels[0]}): a find-links directory or "
            "extra index provides it; run with PIP_FIND_LINKS= and pip's default index"
        )


def _pip(*args: str) -> None:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    subprocess.run(command, check=True)


def _copy_installers(stage: Path, options: BundleOptions) -> None:
    for name in _INSTALLERS:
        shutil.copy2(_REPO / "installers" / name, stage / name)
    (stage / "requirements.txt").write_text("\n".join(requirements(options)) + "\n")


def _write_manifest(stage: Path, options: BundleOptions, models: list[str]) -> dict:
    files = sorted(p for p in stage.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    entries = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="sha256 manifest") as bar:
        for path in files:
            entries[path.relative_to(stage).as_posix()] = {
                "sha256": _sha256(path, bar), "size": path.stat().st_size}
    manifest = {
        "format": 1,
        "hearth_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python_version": options.python_version,
        "platforms": list(options.platforms),
        "torch": options.torch,
        "ui": options.ui,
        "requirements": requirements(options),
        "lock": LOCK_FILES[options.torch],
        "models": models,
        "files": entries,
    }
    (stage / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _write_tar(stage: Path, out: Path) -> None:
    files = sorted(p for p in stage.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    partial = out.with_name(out.name + ".partial")
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {out.name}") as bar:
        with tarfile.open(partial, "w") as tar:
            for path in files:
                info = tar.gettarinfo(path, f"{TOP}/{path.relative_to(stage).as_posix()}")
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                with path.open("rb") as f:
                    tar.addfile(info, _Counted(f, bar))
    partial.replace(out)


class _Counted:
    """A file object that advances a progress bar as tarfile reads it."""

    def __init__(self, f, bar: tqdm) -> None:
        self._f, self._bar = f, bar

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self._bar.update(len(data))
        return data


def _copy_with_progress(pairs: list[tuple[Path, Path]], desc: str) -> None:
    total = sum(src.stat().st_size for src, _ in pairs)
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc) as bar:
        for src, dst in pairs:
            dst.parent.mkdir(parents=True, exist_ok=True)
            with src.open("rb") as fin, dst.open("wb") as fout:
                for chunk in iter(lambda fin=fin: fin.read(1 << 20), b""):
                    fout.write(chunk)
                    bar.update(len(chunk))


def _sha256(path: Path, bar: tqdm | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return digest.hexdigest()


def _step(text: str) -> None:
    print(f"==> {text}", flush=True)


def _print_summary(out: Path, manifest: dict) -> None:
    files = manifest["files"]
    wheels = {k: v["size"] for k, v in files.items() if k.startswith("wheels/")}
    torch = next((k.split("/")[1] for k in wheels if k.startswith("wheels/torch-")), "none")
    models = sum(v["size"] for k, v in files.items() if k.startswith("models/"))
    manifest_hash = _sha256_bytes(json.dumps(manifest, indent=2) + "\n")
    print(f"\n{out}: {out.stat().st_size / 1e6:.1f} MB, sha256 {_sha256(out)}")
    print(f"  wheels:   {len(wheels)} files, {sum(wheels.values()) / 1e6:.1f} MB ({torch})")
    print(f"  models:   {', '.join(manifest['models'])} ({models / 1e6:.1f} MB)")
    print(f"  target:   CPython {manifest['python_version']}, {manifest['platforms'][0]}")
    print(f"  manifest: sha256 {manifest_hash} (install.sh prints it: compare before trusting)")
    print(f"On the target: tar xf {out.name} && sudo {TOP}/install.sh")


def _sha256_bytes(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
