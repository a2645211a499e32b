"""`hearth`: the command line, and the composition root of the process.

It is the only module that imports ui/, and lazily, so that `--no-ui` never pays gradio's import
(seconds). It builds Settings, the engine factory, the app, mounts the UI, and runs the server.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from hearth import __version__
from hearth.appliance.settings import Settings, add_arguments, settings_from
from hearth.appliance.tools import bundle, cert, doctor, keys, models, quantize

EXIT_USAGE = 2
# Subcommands that live in their own module: `add_parser(subparsers)` and `run(args) -> int`.
TOOLS = {
    "models": models, "bundle": bundle, "doctor": doctor, "quantize": quantize,
    "keys": keys, "cert": cert,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hearth",
        description="Hearth: a local LLM inference appliance (OpenAI-compatible API and chat UI).",
    )
    parser.add_argument("--version", action="version", version=f"hearth {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve a model over the OpenAI API (and the browser UI)",
        description="Serve a model: OpenAI-compatible API at /v1, chat UI at /, /health, "
        "/metrics. Every option can also be set with its HEARTH_* environment "
        "variable; a flag wins over the variable.",
    )
    add_arguments(serve)
    for tool in TOOLS.values():
        tool.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        try:
            settings = settings_from(args, os.environ)  # checks the engine settings too
        except ValueError as error:
            parser.error(str(error))
        return serve(settings)
    if args.command in TOOLS:
        return TOOLS[args.command].run(args)
    parser.print_help()
    return EXIT_USAGE


def serve(settings: Settings, factory: Callable[[], Any] | None = None) -> int:
    """Run `hearth serve` until SIGTERM (exit 0) or an engine failure (exit 1)."""
    from hearth.appliance import lifecycle
    from hearth.appliance.routes import create_app

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # CUDA numbers cards as NVML does (bus order): --device cuda:1 is the NVML panel's GPU 1.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    sock = lifecycle.bind(settings.host, settings.port)
    model = settings.model or "the default model"
    print(f"Loading {model} on {settings.device} ...", flush=True)
    app = create_app(settings, factory or engine_factory(settings))
    if not settings.no_ui:
        mount_ui(app)
    return lifecycle.run(app, app.state.hearth, sock)


def engine_factory(settings: Settings) -> Callable[[], Any]:
    """Loads the LLMEngine when called (on the engine thread or in the engine process, with a
    progress bar); with --data-parallel-size N, N replicas behind one router
    (engine/data_parallel/). A partial of a module function: it pickles for the engine process."""
    return functools.partial(load_engine, settings)


def load_engine(settings: Settings) -> Any:
    if settings.data_parallel_size > 1:
        from hearth.engine.data_parallel.replicated_engine import ReplicatedEngine

        return ReplicatedEngine.load(settings.engine, settings.data_parallel_size)
    from hearth.engine.llm_engine import LLMEngine  # torch: imported where the engine runs

    return LLMEngine(settings.engine, progress=True)


def mount_ui(app: Any) -> None:
    """Mount the browser UI at / once the model is ready (`ui.deferred`: the API's first token
    does not wait for gradio's imports); without gradio, serve the API only."""
    if importlib.util.find_spec("gradio") is None:
        logging.getLogger("hearth").warning(
            "gradio is not installed: serving the API only (pip install 'hearth[ui]', or --no-ui)"
        )
        return
    from hearth.ui.deferred import mount_ui_when_ready

    mount_ui_when_ready(app, app.state.hearth)


if __name__ == "__main__":
    sys.exit(main())
