"""Hearth, a local LLM inference appliance. Offline API: `from hearth import LLM, SamplingParams`.

This file is the `hearth` package's own: the repository root is the package, so `engine/`,
`kernels/`, `appliance/` and `ui/` import as `hearth.engine`, `hearth.kernels`, ... (pyproject.toml
maps it). Names load lazily: `import hearth` costs no torch.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hearth")
except PackageNotFoundError:  # a checkout that was never installed
    __version__ = "0.1.0"

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "__version__"]


def __getattr__(name: str):
    if name in ("LLM", "LLMEngine", "EngineConfig", "SamplingParams"):
        from hearth import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'hearth' has no attribute {name!r}")
