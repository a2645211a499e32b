"""OpenAI request schemas (pydantic) and the OpenAI error format.

Requests are parsed strictly: a wrong JSON type is a 400 naming the field, never a silent coercion.
Fields fall in four groups:
  - supported: they change what the engine does;
  - accepted and ignored: OpenAI's bookkeeping fields (`user`, `metadata`, `store`, ...);
  - known but unsupported (`audio`, `suffix`, `best_of` > n, ...): 400 naming them when set;
  - unknown: accepted and ignored, each name logged once at warning level (as vLLM does: a
    strict server's 400 has broken clients that send a newer field).
Tool and structured-output schemas live in protocol_tools.py.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from hearth.appliance.protocol_tools import (
    Strict,
    StructuredOutputFields,
    Tool,
    ToolCall,
    ToolChoice,
)

logger = logging.getLogger("hearth.server")


class APIError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


class StreamOptions(Strict):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _SamplingFields(StructuredOutputFields):
    """Fields shared by both endpoints (OpenAI's plus vLLM's extensions)."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    priority: int = 0
    # Accepted and ignored: OpenAI bookkeeping.
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(Strict):
    type: str
    text: str | None = None


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool result: which call it answers
    reasoning_content: str | None = None  # echoed back by clients of reasoning models
    # What the openai SDK echoes back for an assistant turn; only empty values are accepted.
    function_call: Any = None
    refusal: str | None = None
    audio: Any = None
    annotations: list[Any] | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None  # default: "auto" with tools, else "none"
    parallel_tool_calls: bool | None = None  # default true
    chat_template_kwargs: dict[str, Any] | None = None  # e.g. {"enable_thinking": false}
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    # Known but unsupported: 400 when set to anything but their neutral value.
    functions: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None
    # Accepted and ignored: hints without effect on this server.
    verbosity: str | None = None


class TokenizeRequest(Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int]


# Fields whose type is a union: one readable sentence instead of pydantic's error per member.
_EXPECTED = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "a string or a list of strings",
    "content": "a string or a list of text parts",
    "tool_choice": '"none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
}
_UNION_TAGS = {
    "str",
    "int",
    "float",
    "bool",
    "list",
    "dict",
    "none",
    "list[int]",
    "list[str]",
    "list[list[int]]",
    "list[TextPart]",
    "NamedToolChoice",
    "dict[str,any]",
}


def parse_request(model: type[BaseModel], body: bytes,
                  unknown: UnknownFieldLog | None = None) -> Any:
    """Parse and check a JSON body; APIError(400) naming the offending field otherwise. Unknown
    fields are accepted; `unknown` logs each name once."""
    if not body.strip():
        raise bad_request("the request body is empty; send a JSON object")
    try:
        request = model.model_validate_json(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    if unknown is not None:
        unknown.note(request)
    return request


class UnknownFieldLog:
    """Logs each unknown request field once, by its path (`frobnicate`, `messages[].foo`)."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def note(self, request: BaseModel) -> list[str]:
        """The unknown field paths of `request` not logged before (logged now)."""
        new = []
        with self._lock:
            for path in dict.fromkeys(unknown_fields(request)):
                if path not in self._seen:
                    self._seen.add(path)
                    new.append(path)
        for path in new:
            logger.warning("ignoring unknown request field %r (logged once per field name)", path)
        return new


def unknown_fields(obj: BaseModel, path: str = "") -> Iterator[str]:
    """Paths of the fields `obj` (and the models inside it) did not declare; list positions are
    written `[]` so that one name is one path however many messages carry it."""
    for name in sorted(obj.model_extra or {}):
        yield path + name
    for name in type(obj).model_fields:
        value = getattr(obj, name)
        children = value if isinstance(value, list) else [value]
        suffix = "[]." if isinstance(value, list) else "."
        for child in children:
            if isinstance(child, BaseModel):
                yield from unknown_fields(child, f"{path}{name}{suffix}")


def _validation_error(exc: ValidationError) -> APIError:
    error = exc.errors(include_url=False)[0]
    if error["type"] == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {error['msg']}")
    if error["type"] == "model_type" and not error["loc"]:
        return bad_request("the request body must be a JSON object")
    loc = [str(part) for part in error["loc"] if str(part) not in _UNION_TAGS]
    loc = [part for part in loc if not part.startswith(("function-", "literal["))]
    field = ".".join(loc) or "body"
    param = loc[0] if loc else None
    if error["type"] == "missing":
        return bad_request(f"{field} is required", param=param)
    last = loc[-1] if loc else ""
    if last in _EXPECTED:
        return bad_request(f"{field} must be {_EXPECTED[last]}", param=param)
    return bad_request(f"{field}: {error['msg']}", param=param)
