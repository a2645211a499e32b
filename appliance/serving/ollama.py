"""Ollama's /api/chat and /api/generate as translations: each Ollama request becomes the OpenAI
request it means, which runs through ChatServing or CompletionServing like any /v1 request (same
checks, admission and 429, metrics); the OpenAI chunks come back as Ollama's NDJSON lines
(ollama_replies.py).

    /api/chat       messages, tools, format, think, options  → ChatCompletionRequest
    /api/generate   prompt (+ system), through the chat template → ChatCompletionRequest
                    raw: true, suffix (fill-in-the-middle), or a model without a chat template
                                                              → CompletionRequest
    options         num_predict → max_tokens, temperature, top_p, top_k, min_p, seed, stop,
                    repeat_penalty → repetition_penalty, presence/frequency_penalty;
                    num_ctx checked against the model's context length
    format          "json" → response_format json_object; a schema → json_schema
    think           chat_template_kwargs {"enable_thinking": ...} (+ reasoning_effort)

Errors leave in Ollama's format and name Ollama's field: a 400 on response_format says `format`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from hearth.appliance.ollama_protocol import (
    OllamaChatRequest,
    OllamaError,
    OllamaGenerateRequest,
    OllamaMessage,
    OllamaOptions,
)
from hearth.appliance.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    parse_request,
)
from hearth.appliance.serving.capabilities import SERVER_FEATURES
from hearth.appliance.serving.chat import ChatServing
from hearth.appliance.serving.completion import CompletionServing
from hearth.appliance.serving.core import EventStream, Serving, api_error
from hearth.appliance.serving.ollama_replies import ReplyWriter, load_reply, openai_chunks
from hearth.engine.prepare import ModelInfo

# Ollama's documented defaults where a client sends no option (repeat_penalty stays off: a
# penalty makes the GPU engine step synchronously).
DEFAULT_SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}
# OpenAI param → the Ollama field a client sent.
_OLLAMA_FIELD = {
    "max_tokens": "options.num_predict",
    "temperature": "options.temperature",
    "top_p": "options.top_p",
    "top_k": "options.top_k",
    "min_p": "options.min_p",
    "seed": "options.seed",
    "stop": "options.stop",
    "repetition_penalty": "options.repeat_penalty",
    "presence_penalty": "options.presence_penalty",
    "frequency_penalty": "options.frequency_penalty",
    "response_format": "format",
    "chat_template_kwargs": "think",
    "reasoning_effort": "think",
}


def chat_body(request: OllamaChatRequest, model: ModelInfo, name: str) -> dict[str, Any]:
    """The OpenAI chat request an Ollama chat means (a JSON object, parsed as /v1 parses it)."""
    _reject_logprobs(request)
    body = {"model": name, "messages": openai_messages(request.messages)}
    body.update(sampling(request.options, model))
    if request.tools:
        body["tools"] = request.tools
    body.update(_format(request.format) | _think(request.think))
    return body


def generate_body(
    request: OllamaGenerateRequest, model: ModelInfo, name: str
) -> tuple[type, dict[str, Any]]:
    """(the OpenAI request class, its body) for an Ollama generate request."""
    _reject_logprobs(request)
    for field, what in (("images", "images (this server runs text-only models)"),
                        ("template", "template (send raw: true with the prompt formatted)"),
                        ("context", "context (send the conversation to /api/chat instead)")):
        if getattr(request, field):
            raise OllamaError(400, f"{what} is not supported by this server")
    body: dict[str, Any] = {"model": name, **sampling(request.options, model)}
    body.update(_format(request.format) | _think(request.think))
    has_template = bool(getattr(model.tokenizer, "chat_template", True))
    if request.raw or request.suffix or not has_template:
        body["prompt"] = request.prompt
        if request.suffix:
            body["suffix"] = request.suffix
        body.setdefault("max_tokens", None)  # /v1/completions would stop at 16
        return CompletionRequest, body
    system = [{"role": "system", "content": request.system}] if request.system else []
    body["messages"] = [*system, {"role": "user", "content": request.prompt}]
    return ChatCompletionRequest, body


def sampling(options: OllamaOptions | None, model: ModelInfo) -> dict[str, Any]:
    """OpenAI sampling fields from Ollama options."""
    options = options or OllamaOptions()
    body: dict[str, Any] = {
        key: DEFAULT_SAMPLING[key] if value is None else value
        for key, value in (("temperature", options.temperature), ("top_k", options.top_k),
                           ("top_p", options.top_p))
    }
    for key, value in (("min_p", options.min_p), ("seed", options.seed),
                       ("repetition_penalty", options.repeat_penalty),
                       ("presence_penalty", options.presence_penalty),
                       ("frequency_penalty", options.frequency_penalty)):
        if value is not None:
            body[key] = value
    if options.stop:
        body["stop"] = [options.stop] if isinstance(options.stop, str) else options.stop
    num_predict = options.num_predict
    if num_predict is not None and num_predict not in (-1, -2):  # -1, -2: up to the context
        if num_predict < 1:
            raise OllamaError(400, "options.num_predict must be a positive number of tokens, or "
                                   "-1 (until the model stops or the context is full)")
        body["max_tokens"] = num_predict
    if options.num_ctx is not None and options.num_ctx > model.max_model_len:
        raise OllamaError(
            400, f"options.num_ctx is {options.num_ctx}, but the model's context length here is "
                 f"{model.max_model_len}: set the client's context length (num_ctx) to at most "
                 f"{model.max_model_len}")
    return body


def openai_messages(messages: list[OllamaMessage]) -> list[dict[str, Any]]:
    """Ollama messages as OpenAI's: tool calls get ids, and each tool reply the id of the call it
    answers (the first open call of its tool_name, else the first open call)."""
    converted: list[dict[str, Any]] = []
    open_calls: list[tuple[str, str]] = []  # (id, function name) of calls not yet answered
    for i, message in enumerate(messages):
        if message.images:
            raise OllamaError(400, f"messages[{i}].images: images are not supported by this "
                                   "server (it runs text-only models)")
        entry: dict[str, Any] = {"role": message.role, "content": message.content or ""}
        if message.tool_calls:
            entry["tool_calls"] = []
            for j, call in enumerate(message.tool_calls):
                call_id = f"call_{i}_{j}"
                arguments = call.function.arguments
                entry["tool_calls"].append({"id": call_id, "type": "function", "function": {
                    "name": call.function.name,
                    "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
                }})
                open_calls.append((call_id, call.function.name))
        if message.role == "tool":
            entry["tool_call_id"] = _answered_call(open_calls, message.tool_name, i)
            if message.tool_name:
                entry["name"] = message.tool_name
        converted.append(entry)
    return converted


def _answered_call(open_calls: list[tuple[str, str]], tool_name: str | None, index: int) -> str:
    for k, (call_id, name) in enumerate(open_calls):
        if tool_name in (None, name):
            del open_calls[k]
            return call_id
    if open_calls:
        return open_calls.pop(0)[0]
    return f"call_{index}"  # a tool reply without a call before it: the template decides


def _format(value: str | dict[str, Any] | None) -> dict[str, Any]:
    if value in (None, ""):
        return {}
    if value == "json":
        return {"response_format": {"type": "json_object"}}
    if isinstance(value, dict):
        schema = {"name": "format", "schema": value, "strict": True}
        return {"response_format": {"type": "json_schema", "json_schema": schema}}
    raise OllamaError(400, f"format must be \"json\" or a JSON schema object, got {value!r}")


def _think(value: bool | str | None) -> dict[str, Any]:
    if value is None or (value is False and not SERVER_FEATURES.thinking):
        return {}  # without a reasoning split there is nothing to switch off
    body: dict[str, Any] = {"chat_template_kwargs": {"enable_thinking": bool(value)}}
    if isinstance(value, str):
        body["reasoning_effort"] = value  # "low" | "medium" | "high"
    return body


def _reject_logprobs(request: OllamaChatRequest | OllamaGenerateRequest) -> None:
    if request.logprobs or request.top_logprobs:
        raise OllamaError(400, "logprobs is not supported on /api; use /v1 for log probabilities")


def ollama_error(error: APIError) -> OllamaError:
    """An OpenAI-format error of the translated request, naming the Ollama field."""
    field = _OLLAMA_FIELD.get(error.param or "")
    message = error.message
    if field is not None and message.startswith("Unrecognized request argument"):
        message = f"{field} is not supported by this server"
    elif field is not None:
        message = f"{field}: {message}"
    message = message.replace("max_tokens", "num_predict")  # the length checks' word for it
    return OllamaError(error.status, message, error.headers)


@dataclass
class OllamaReply:
    """A submitted request's Ollama answer: `lines()` to stream it, or `whole()`. `stream` None:
    nothing to generate (a client loading the model)."""

    writer: ReplyWriter
    stream: EventStream | None

    async def lines(self) -> AsyncIterator[dict[str, Any]]:
        """The NDJSON objects; an error after the first line is a last {"error": ...} line."""
        if self.stream is None:
            yield load_reply(self.writer.model, self.writer.chat)
            return
        try:
            async for chunk in openai_chunks(self.stream.events):
                line = self.writer.feed(chunk)
                if line is not None:
                    yield line
            for line in self.writer.last_lines():
                yield line
        except OllamaError as error:
            yield error.body()
        finally:
            self.close()

    async def whole(self) -> dict[str, Any]:
        if self.stream is None:
            return load_reply(self.writer.model, self.writer.chat)
        try:
            async for chunk in openai_chunks(self.stream.events):
                self.writer.feed(chunk)
            return self.writer.whole()
        finally:
            self.close()

    def close(self) -> None:
        """Abort whatever still runs (the client hung up, or the reply is complete)."""
        if self.stream is not None:
            self.stream.close()


class OllamaServing:
    """/api/chat and /api/generate over the OpenAI serving entries; /api/show and the other
    model routes live in ollama_models.py."""

    def __init__(self, serving: Serving, chat: ChatServing, completions: CompletionServing):
        self.serving = serving
        self._chat = chat
        self._completions = completions

    def resolve_model(self, requested: str | None) -> str:
        """The served name for an Ollama model name ("name" or "name:latest"); 404 otherwise."""
        names = self.serving.model_names()
        requested = requested or ""
        base = requested.removesuffix(":latest")
        if base in names:
            return base
        raise OllamaError(404, f"model {requested!r} not found; this server serves "
                               f"{', '.join(repr(n) for n in names)}")

    def chat(self, request: OllamaChatRequest) -> OllamaReply:
        name = self.resolve_model(request.model)
        writer = ReplyWriter(name, chat=True)
        if not request.messages:
            return OllamaReply(writer, None)
        body = chat_body(request, self.serving.model, name)
        return OllamaReply(writer, self._submit(ChatCompletionRequest, body))

    def generate(self, request: OllamaGenerateRequest) -> OllamaReply:
        name = self.resolve_model(request.model)
        writer = ReplyWriter(name, chat=False)
        if not (request.prompt or request.suffix):
            return OllamaReply(writer, None)
        schema, body = generate_body(request, self.serving.model, name)
        return OllamaReply(writer, self._submit(schema, body))

    def _submit(self, schema: type, body: dict[str, Any]) -> EventStream:
        """Parse the OpenAI body as /v1 parses it, check and submit it (streamed internally, with
        usage, so that both Ollama shapes are built from the same chunks)."""
        body.update(stream=True, stream_options={"include_usage": True})
        try:
            request = parse_request(schema, json.dumps(body).encode())
            if schema is ChatCompletionRequest:
                return self._chat.stream(request)
            return self._completions.stream(request)
        except Exception as error:  # noqa: BLE001 - 400s, 429, 503 alike, in Ollama's format
            raise ollama_error(api_error(error)) from None
