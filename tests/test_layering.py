"""The layering rule, checked on the import statements (lazy ones inside functions count too):

    hearth.cli (composition root: cli.py, __main__.py)
     ├─► hearth.ui ─────► hearth.appliance.serving only (the serving layer the routes use)
     └─► hearth.appliance ─► hearth.engine ─► hearth.kernels
         hearth.appliance.tools: beside the server, imported by the CLI alone

No import cycles between modules; the scheduling core imports no torch; the loader needs no
kernels; engine/ and kernels/ import no web framework.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("appliance", "engine", "kernels", "ui")
WEB = ("fastapi", "uvicorn", "pydantic", "gradio", "starlette")
# module prefix -> import prefixes it must not use (the longest matching prefix applies)
FORBIDDEN = {
    "hearth.kernels": ("hearth.engine", "hearth.appliance", "hearth.ui", "hearth.cli", *WEB),
    "hearth.engine": ("hearth.appliance", "hearth.ui", "hearth.cli", *WEB),
    "hearth.engine.loader": ("hearth.kernels", "hearth.appliance", "hearth.ui", "hearth.cli", *WEB),
    "hearth.appliance": ("hearth.ui", "hearth.cli", "hearth.appliance.tools"),
    "hearth.appliance.tools": ("hearth.ui", "hearth.cli"),
}
UI_MAY_IMPORT = ("hearth.appliance.serving",)
TORCH_FREE = ["engine/scheduler.py", "engine/block_manager.py", "engine/sequence.py",
              "engine/outputs.py", "engine/sampling_params.py", "engine/config.py",
              "engine/prepare.py", "engine/snapshot.py"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("hearth", *parts))


def _modules() -> dict[str, Path]:
    found = {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    found.update({_module_name(p): p for p in ROOT.glob("*.py")})
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every absolute import of the module, as dotted names (`from a import b` gives a and a.b)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _forbidden_for(module: str) -> tuple[str, ...]:
    prefixes = [p for p in FORBIDDEN if _under(module, p)]
    return FORBIDDEN[max(prefixes, key=len)] if prefixes else ()


def _our_module(name: str) -> str | None:
    """The module of ours that an imported name refers to (`hearth.x.y.Name` -> `hearth.x.y`)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def test_no_generic_top_level_imports():
    """Ours are imported as hearth.*: a bare `engine` or `kernels` would be someone else's."""
    for module, path in MODULES.items():
        bad = {n for n in _imports(path) if n.split(".")[0] in PACKAGES}
        assert not bad, f"{module} imports {sorted(bad)}: use hearth.{sorted(bad)[0]}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _forbidden_for(m)))
def test_imports_point_down(module):
    forbidden = _forbidden_for(module)
    bad = {n for n in _imports(MODULES[module]) if any(_under(n, p) for p in forbidden)}
    assert not bad, f"{module} imports {sorted(bad)}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _under(m, "hearth.ui")))
def test_ui_talks_to_the_serving_layer_only(module):
    ours = {n for n in _imports(MODULES[module]) if _under(n, "hearth")}
    bad = {n for n in ours if not _under(n, "hearth.ui")
           and not any(_under(n, p) for p in UI_MAY_IMPORT)}
    assert not bad, f"{module} imports {sorted(bad)}; the UI uses hearth.appliance.serving"


def test_only_the_entry_point_imports_the_cli():
    importers = {m for m, path in MODULES.items() if m not in ("hearth.cli", "hearth.__main__")
                 and any(_under(n, "hearth.cli") for n in _imports(path))}
    assert not importers


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        targets = {_our_module(n) for n in _imports(path) if _under(n, "hearth")}
        graph[module] = {t for t in targets if t and t != module and t != "hearth"}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_cycle_check_can_fail():
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_scheduling_core_imports_no_torch(module):
    assert not any(_under(n, "torch") for n in _imports(ROOT / module)), f"{module} imports torch"


def test_the_server_imports_no_torch_before_the_engine_loads():
    """`hearth serve` binds its port and prints before the engine thread imports torch (and
    `hearth --help` never pays for it)."""
    import subprocess
    import sys

    code = "import sys, hearth.cli, hearth.appliance.routes; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd="/").returncode == 0
