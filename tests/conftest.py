"""Test setup shared by every test module.

Triton reads TRITON_INTERPRET when `@triton.jit` runs, so it is set here, before any kernel module
is imported: on a machine without CUDA the kernels run in Triton's interpreter (small shapes only).

The repository root must not be on sys.path (`python -m pytest` puts it there): its folders
`kernels/`, `engine/`, `ui/` would shadow packages of those names that transformers imports.
Hearth is imported as the installed `hearth` package.
"""

import os
import random
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests must not reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seeded_rngs():
    """Each test draws its random inputs from the same seeds, so that a draw that happens to hold
    a near-tie fails on every run and every machine alike, not once in a while in CI."""
    random.seed(0)
    torch.manual_seed(0)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(0)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
