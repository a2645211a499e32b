"""OpenAI request schemas (pydantic) and the OpenAI error format.

Requests are parsed strictly: a wrong JSON type is a 400 naming the field, never a silent coercion.
Fields fall in four groups:
  - supported: they change what the engine does;
  - accepted and ignored: OpenAI's bookkeeping fields (`user`, `metadata`, `store`, ...);
  - known but unsupported (`tools`, `suffix`, `best_of` > n, ...): 400 naming them when set;
  - unknown: 400 "Unrecognized request argument supplied", as OpenAI itself answers.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


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


class _Strict(BaseModel):
    # extra="allow" keeps unknown fields in `model_extra` so that we can name them in the 400.
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Strict):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _SamplingFields(_Strict):
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


class TextPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    # What the openai SDK echoes back for an assistant turn; only empty values are accepted.
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
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
    # Known but unsupported: 400 when set to anything but their neutral value.
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None
    # Accepted and ignored: hints without effect on this server.
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


# Fields whose type is a union: one readable sentence instead of pydantic's error per member.
_EXPECTED = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "a string or a list of strings",
    "content": "a string or a list of text parts",
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
}


def parse_request(model: type[BaseModel], body: bytes) -> Any:
    """Parse and check a JSON body; APIError(400) naming the offending field otherwise."""
    if not body.strip():
        raise bad_request("the request body is empty; send a JSON object")
    try:
        request = model.model_validate_json(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    _reject_unknown(request, path="")
    return request


def _reject_unknown(obj: BaseModel, path: str) -> None:
    extra = sorted(obj.model_extra or {})
    if extra:
        names = ", ".join(path + name for name in extra)
        raise bad_request(f"Unrecognized request argument supplied: {names}", param=path + extra[0])
    for name in type(obj).model_fields:
        value = getattr(obj, name)
        children = value if isinstance(value, list) else [value]
        for i, child in enumerate(children):
            if isinstance(child, BaseModel) and not isinstance(child, TextPart):
                where = f"{path}{name}[{i}]." if isinstance(value, list) else f"{path}{name}."
                _reject_unknown(child, where)


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
