"""AppContext: one server's parts, built once from Settings and shared by the HTTP routes, the
process lifecycle and the browser UI (`app.state.hearth`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hearth.appliance import engine_process
from hearth.appliance.async_engine import AsyncEngine, Engine, EngineState
from hearth.appliance.auth.wiring import Auth, build_auth
from hearth.appliance.serving.capabilities import server_features
from hearth.appliance.serving.chat import ChatServing
from hearth.appliance.serving.completion import CompletionServing
from hearth.appliance.serving.core import Serving
from hearth.appliance.settings import Settings
from hearth.appliance.telemetry import Telemetry
from hearth.appliance.tokenize_pool import TokenizePool


@dataclass
class AppContext:
    settings: Settings
    engine: AsyncEngine
    serving: Serving
    chat: ChatServing
    completions: CompletionServing
    telemetry: Telemetry
    auth: Auth


def build_context(settings: Settings, engine_factory: Callable[[], Engine]) -> AppContext:
    """The parts, wired; the engine loads when `engine.start()` runs (the app's lifespan)."""
    engine: AsyncEngine | None = None

    def status() -> dict[str, float]:
        return {
            "requests_in_flight": engine.num_in_flight,
            "engine_ready": float(engine.state is EngineState.READY),
        }

    telemetry = Telemetry(snapshot=lambda: engine.snapshot(), status=status)
    engine = AsyncEngine(
        engine_factory, settings.max_num_seqs, settings.max_queued_requests, observer=telemetry,
        engine_process=engine_process.wanted(settings.engine_process, settings.device,
                                              telemetry.gpu.num_gpus),
        log_level=settings.log_level,
    )
    # The pool refuses only past what the engine's own queues admit (max_queued_requests 429s).
    pool = TokenizePool(max_waiting=settings.max_num_seqs + settings.max_queued_requests)
    serving = Serving(engine, settings.served_model_name,
                      server_features(settings.reasoning_parser), pool)
    chat = ChatServing(serving, settings.tool_call_parser, settings.reasoning_parser)
    auth = build_auth(settings, telemetry.registry)
    return AppContext(settings, engine, serving, chat, CompletionServing(serving), telemetry, auth)
