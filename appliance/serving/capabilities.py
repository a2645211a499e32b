"""What the served model can do here, said the same way everywhere: Ollama's capability names
(`/api/show`), the `capabilities` of each `/v1/models` entry, `hearth models` and the UI's monitor
header all come from `capabilities()`.

A capability is listed only when a request using it would work, end to end, on this server:
    completion  always
    insert      the model has fill-in-the-middle tokens (engine/fim.py): /v1/completions suffix
    tools       the chat endpoint takes tools and parses tool calls (ServerFeatures.tools)
    thinking    the server splits reasoning from the answer (ServerFeatures.thinking: not with
                --reasoning-parser none) and the model thinks: its chat template writes or strips
                <think> blocks (reasoning.detect), or the operator named a reasoning parser
Structured output (`response_format`, Ollama's `format`) has no Ollama capability name; it works
when the engine has a grammar compiler (ModelInfo.grammars).
tests/test_capabilities.py checks the features against what the chat endpoint accepts, so a
feature that stops working (or starts) fails a test until this file says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from hearth.appliance.serving.reasoning import detect as template_thinks
from hearth.engine.prepare import ModelInfo


@dataclass(frozen=True)
class ServerFeatures:
    """Request features the serving layer implements, whatever the model."""

    tools: bool  # tools / tool_choice on chat completions, tool calls parsed from the output
    thinking: bool  # reasoning_content split from content (Ollama: `thinking`)
    always_thinks: bool = False  # --reasoning-parser names a parser: whatever the template says


SERVER_FEATURES = ServerFeatures(tools=True, thinking=True)


def server_features(reasoning_parser: str = "auto") -> ServerFeatures:
    """The features of a server started with this --reasoning-parser ("none": no split)."""
    return ServerFeatures(tools=True, thinking=reasoning_parser != "none",
                          always_thinks=reasoning_parser not in ("auto", "none"))


def capabilities(model: ModelInfo, features: ServerFeatures = SERVER_FEATURES) -> list[str]:
    """The model's capabilities on this server, in Ollama's names and order."""
    found = ["completion"]
    if features.tools:
        found.append("tools")
    if model.fim is not None:
        found.append("insert")
    template = getattr(model.tokenizer, "chat_template", None)
    if features.thinking and (features.always_thinks or template_thinks(template)):
        found.append("thinking")  # the same test ChatServing.parses_reasoning makes
    return found
