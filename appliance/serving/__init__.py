"""The serving layer: what the HTTP routes and the browser UI both call.

    routes.py ─┐                    core.py        prompt checks (the engine's prepare), sampling
               ├─► AppContext ────► chat.py        parameters, requests run, collected or
    ui/ ───────┘    (context.py)    completion.py  streamed, usage
                                    tokens.py      chat template, /tokenize, /detokenize

The UI imports only this package; the names below are what it may use.
"""

from hearth.appliance.auth.call import CallRecord
from hearth.appliance.deltas import ABORT, RequestDelta
from hearth.appliance.protocol import ChatCompletionRequest, ChatMessage, bad_request
from hearth.appliance.request_stream import RequestStream
from hearth.appliance.serving.context import AppContext, build_context
from hearth.appliance.serving.core import Serving, api_error
from hearth.appliance.telemetry import GpuSample, HostSample, engine_gpu_indices
from hearth.engine.block_manager import BlockSnapshot
from hearth.engine.snapshot import EngineSnapshot
from hearth.engine.speculative.stats import SpecDecodeStats

__all__ = [
    "ABORT", "AppContext", "BlockSnapshot", "CallRecord", "ChatCompletionRequest", "ChatMessage",
    "EngineSnapshot", "GpuSample", "HostSample", "RequestDelta", "RequestStream", "Serving",
    "SpecDecodeStats", "api_error", "bad_request", "build_context", "engine_gpu_indices",
]
