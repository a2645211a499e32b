"""Hearth's process: CLI, settings, the async bridge to the engine, the HTTP API and its metrics."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hearth")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0.1.0"
