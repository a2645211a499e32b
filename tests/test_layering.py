"""The layering rule: ui -> appliance -> engine -> kernels, checked on the import statements."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WEB = {"fastapi", "uvicorn", "pydantic", "gradio", "starlette"}
# package -> packages of ours it may not import
FORBIDDEN = {
    "kernels": {"engine", "appliance", "ui"} | WEB,
    "engine": {"appliance", "ui"} | WEB,
    "appliance": {"ui"},  # except the composition root, which imports ui lazily
}
TORCH_FREE = ["engine/scheduler.py", "engine/block_manager.py", "engine/sequence.py",
              "engine/outputs.py", "engine/sampling_params.py", "engine/config.py"]


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_downwards(package):
    for path in (ROOT / package).rglob("*.py"):
        top_only = path.name == "cli.py" and package == "appliance"
        bad = _imports(path, top_level_only=top_only) & FORBIDDEN[package]
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("module", TORCH_FREE)
def test_scheduling_core_imports_no_torch(module):
    assert "torch" not in _imports(ROOT / module), f"{module} imports torch"
