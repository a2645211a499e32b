"""Bounds on every per-request cost a client controls, checked before any work (400, the field).

    field              bound                          what it would cost unbounded
    messages           MAX_MESSAGES entries           chat-template rendering, per message
    prompt (list)      MAX_PROMPTS prompts            one engine request each
    stop               MAX_STOP strings, MAX_STOP_CHARS in all   a scan of the text at every token
    stop_token_ids     MAX_STOP_TOKEN_IDS ids         a set lookup at every token
    logit_bias         MAX_LOGIT_BIAS entries         a scatter into the logits at every step
    tools              MAX_TOOLS tools, MAX_TOOLS_CHARS of JSON   the template, a grammar per call

Schemas and grammars (response_format, structured_outputs, guided_*, a forced tool's parameters)
are bounded where they are read (engine/structured_output.py: MAX_SPEC_CHARS, depth, choices).
The whole body is capped before it is read (appliance/body_limit.py), and a prompt longer than
the context can hold is refused by its length before it is tokenized (engine/prepare.py).
"""

from __future__ import annotations

import json
from typing import Any

from hearth.appliance.protocol import bad_request

MAX_MESSAGES = 2048
MAX_PROMPTS = 256
MAX_STOP = 64
MAX_STOP_CHARS = 16_384
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024  # OpenAI's own limit is 300 entries
MAX_TOOLS = 256  # OpenAI's own limit is 128 tools
MAX_TOOLS_CHARS = 256_000


def check_request_limits(request: Any) -> None:
    """APIError(400) naming the first field over its bound. `request`: a CompletionRequest or a
    ChatCompletionRequest (fields it lacks are skipped)."""
    _check_count("messages", getattr(request, "messages", None), MAX_MESSAGES)
    prompt = getattr(request, "prompt", None)
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        _check_count("prompt", prompt, MAX_PROMPTS, "prompts")
    _check_stop(getattr(request, "stop", None))
    _check_count("stop_token_ids", getattr(request, "stop_token_ids", None), MAX_STOP_TOKEN_IDS)
    _check_count("logit_bias", getattr(request, "logit_bias", None), MAX_LOGIT_BIAS)
    _check_tools(getattr(request, "tools", None))


def _check_count(field: str, values: Any, limit: int, what: str = "entries") -> None:
    if values is not None and len(values) > limit:
        raise bad_request(f"{field} has {len(values)} {what}; this server takes at most {limit}",
                          param=field)


def _check_stop(stop: str | list[str] | None) -> None:
    if stop is None:
        return
    stops = [stop] if isinstance(stop, str) else stop
    _check_count("stop", stops, MAX_STOP, "strings")
    total = sum(len(s) for s in stops)
    if total > MAX_STOP_CHARS:
        raise bad_request(f"stop has {total} characters in all; this server takes at most "
                          f"{MAX_STOP_CHARS}", param="stop")


def _check_tools(tools: list[Any] | None) -> None:
    if not tools:
        return
    _check_count("tools", tools, MAX_TOOLS, "tools")
    size = sum(len(json.dumps(tool.model_dump(by_alias=True, exclude_none=True)))
               for tool in tools)
    if size > MAX_TOOLS_CHARS:
        raise bad_request(f"tools are {size} characters of JSON in all; this server takes at "
                          f"most {MAX_TOOLS_CHARS} (describe fewer tools, or shorter)",
                          param="tools")
