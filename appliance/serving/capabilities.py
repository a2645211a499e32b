"""What the served model can do here, said the same way everywhere: Ollama's capability names
(`/api/show`), the `capabilities` of each `/v1/models` entry, `hearth models` and the UI's monitor
header all come from `capabilities()`.

A capability is listed only when a request using it would work, end to end, on this server:
    completion  always
    insert      the model has fill-in-the-middle tokens (engine/fim.py): /v1/completions suffix
    tools       the server parses tool calls (SERVER_FEATURES.tools)
    thinking    the server splits reasoning from the answer (SERVER_FEATURES.thinking) and the
                model's chat template has a thinking switch
tests/test_capabilities.py checks SERVER_FEATURES against what the chat endpoint accepts, so a
feature that starts working (or stops) fails a test until this file says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from hearth.engine.prepare import ModelInfo


@dataclass(frozen=True)
class ServerFeatures:
    """Request features the serving layer implements, whatever the model."""

    tools: bool  # tools / tool_choice on chat completions, tool calls parsed from the output
    thinking: bool  # reasoning_content split from content (Ollama: `thinking`)
    structured_output: bool  # response_format json_object / json_schema (Ollama: `format`)


SERVER_FEATURES = ServerFeatures(tools=False, thinking=False, structured_output=False)
_THINKING_MARKERS = ("enable_thinking", "<think>")


def capabilities(model: ModelInfo, features: ServerFeatures = SERVER_FEATURES) -> list[str]:
    """The model's capabilities on this server, in Ollama's names and order."""
    found = ["completion"]
    if features.tools:
        found.append("tools")
    if model.fim is not None:
        found.append("insert")
    if features.thinking and _template_can_think(model):
        found.append("thinking")
    return found


def _template_can_think(model: ModelInfo) -> bool:
    template = getattr(model.tokenizer, "chat_template", None) or ""
    return any(marker in template for marker in _THINKING_MARKERS)
