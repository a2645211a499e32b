"""Ollama request schemas (pydantic) and Ollama's error format, {"error": "message"}.

The shapes follow Ollama's API documentation (docs.ollama.com/api). Ollama itself ignores fields
and options it does not know, and so does Hearth: they are logged, never a 400 (an IDE plugin
written for a newer Ollama must keep working). A field of the wrong type is a 400 naming it.
`options` are parsed loosely, as Ollama's Go decoder does (128.0 is a valid num_predict).
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

logger = logging.getLogger("hearth.ollama")

# Ollama options that change nothing here (memory layout, threads, samplers Hearth lacks): accepted
# and ignored, as docs/clients.md lists them.
IGNORED_OPTIONS = frozenset({
    "numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all", "vocab_only",
    "use_mmap", "use_mlock", "embedding_only", "num_thread", "num_keep", "num_gqa", "tfs_z",
    "typical_p", "repeat_last_n", "mirostat", "mirostat_tau", "mirostat_eta", "penalize_newline",
})


class OllamaError(Exception):
    """An error answered in Ollama's format, {"error": message}, with an HTTP status."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, str]:
        return {"error": self.message}


class _Lenient(BaseModel):
    # extra="allow": unknown fields are kept in model_extra, logged and ignored.
    model_config = ConfigDict(strict=True, extra="allow")


class OllamaOptions(BaseModel):
    """`options`: the ones that map to sampling, and num_ctx (checked against the model)."""

    model_config = ConfigDict(extra="allow")

    num_predict: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: list[str] | str | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    num_ctx: int | None = None


class OllamaFunctionCall(_Lenient):
    name: str
    arguments: dict[str, Any] | str = {}


class OllamaToolCall(_Lenient):
    function: OllamaFunctionCall


class OllamaMessage(_Lenient):
    role: str
    content: str | None = ""
    images: list[str] | None = None
    thinking: str | None = None  # an earlier reply's reasoning; not sent back to the model
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None  # on a tool message: the tool that produced it


class _Generation(_Lenient):
    model: str
    stream: bool | None = None  # None: true, Ollama's default
    format: str | dict[str, Any] | None = None  # "json" or a JSON schema
    options: OllamaOptions | None = None
    keep_alive: float | str | None = None  # accepted; one model stays loaded anyway
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class OllamaChatRequest(_Generation):
    messages: list[OllamaMessage] = []
    tools: list[dict[str, Any]] | None = None


class OllamaGenerateRequest(_Generation):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool | None = None
    images: list[str] | None = None


class OllamaShowRequest(_Lenient):
    model: str | None = None
    name: str | None = None  # the older spelling; Continue still sends it
    verbose: bool | None = None


def parse_ollama(schema: type[BaseModel], body: bytes) -> Any:
    """Parse a JSON body; OllamaError(400) naming the offending field otherwise."""
    if not body.strip():
        raise OllamaError(400, "the request body is empty; send a JSON object")
    try:
        request = schema.model_validate_json(body)
    except ValidationError as exc:
        raise OllamaError(400, _message(exc)) from None
    _log_ignored(request, "")
    return request


def _message(exc: ValidationError) -> str:
    error = exc.errors(include_url=False)[0]
    if error["type"] == "json_invalid":
        return f"the request body is not valid JSON: {error['msg']}"
    if error["type"] == "model_type" and not error["loc"]:
        return "the request body must be a JSON object"
    tags = {"str", "int", "float", "bool", "list", "dict", "none", "list[str]", "dict[str,any]"}
    loc = [str(p) for p in error["loc"] if str(p).replace(" ", "").lower() not in tags]
    field = ".".join(loc) or "body"
    if error["type"] == "missing":
        return f"{field} is required"
    return f"{field}: {error['msg']}"


def _log_ignored(obj: BaseModel, path: str) -> None:
    for name in obj.model_extra or {}:
        if not (isinstance(obj, OllamaOptions) and name in IGNORED_OPTIONS):
            logger.warning("ignoring unknown Ollama field %s%s", path, name)
    for name in type(obj).model_fields:
        value = getattr(obj, name)
        for child in value if isinstance(value, list) else [value]:
            if isinstance(child, BaseModel):
                _log_ignored(child, f"{path}{name}.")
