"""POST /v1/chat/completions: messages → the model's chat template → choices with a `message`,
or `chat.completion.chunk` events with `delta`s:

    {"delta": {"role": "assistant", "content": ""}}     first chunk of each choice
    {"delta": {"content": "Par"}}                         ...
    {"delta": {"content": "is."}, "finish_reason": "stop"}
    {"choices": [], "usage": {...}}                       with stream_options.include_usage
    [DONE]
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from hearth.appliance.protocol import ChatCompletionRequest, bad_request
from hearth.appliance.request_stream import RequestStream
from hearth.appliance.serving.core import (
    DONE,
    ChunkWriter,
    EventStream,
    Result,
    Serving,
    api_error,
    merge,
    sse,
    usage,
)
from hearth.appliance.serving.tokens import chat_prompt
from hearth.engine.outputs import TokenLogprob
from hearth.engine.prepare import PreparedRequest

_MAX_TOP_LOGPROBS = 20


class ChatServing:
    def __init__(self, serving: Serving) -> None:
        self._serving = serving

    def prepare(
        self, request: ChatCompletionRequest, fit_max_tokens: bool = False
    ) -> PreparedRequest:
        """Every check before the engine sees the request (400s naming the field)."""
        serving = self._serving
        response_type = (request.response_format or {}).get("type", "text")
        serving.reject_unsupported(
            request,
            [
                ("tools", bool(request.tools), "tools"),
                ("tool_choice", request.tool_choice not in (None, "none"), "tool_choice"),
                ("functions", bool(request.functions), "functions"),
                ("function_call", request.function_call not in (None, "none"), "function_call"),
                ("response_format", response_type != "text", f"response_format {response_type!r}"),
                ("audio", request.audio is not None, "audio"),
                ("modalities", request.modalities not in (None, ["text"]), "modalities but text"),
                ("prediction", request.prediction is not None, "prediction"),
                (
                    "web_search_options",
                    request.web_search_options is not None,
                    "web_search_options",
                ),
                ("logit_bias", bool(request.logit_bias), "logit_bias"),
            ],
        )
        prompt = chat_prompt(serving.tokenizer, request.messages, request.add_generation_prompt)
        max_tokens = request.max_completion_tokens
        if max_tokens is None:
            max_tokens = request.max_tokens
        params = serving.sampling_params(request, max_tokens, self._num_logprobs(request))
        return serving.prepare(prompt, params, "messages", fit_max_tokens)

    def submit(
        self, request: ChatCompletionRequest, fit_max_tokens: bool = False, origin: str = "chatcmpl"
    ) -> tuple[str, RequestStream]:
        """Check and start a chat completion: its id and its stream. The API's routes and the
        browser UI's chat tab (origin "ui", as the monitor shows it) both come here."""
        prepared = self.prepare(request, fit_max_tokens)
        request_id = f"{origin}-{uuid.uuid4().hex}"
        [stream] = self._serving.submit(request_id, [prepared], request.priority)
        return request_id, stream

    @staticmethod
    def _num_logprobs(request: ChatCompletionRequest) -> int | None:
        top = request.top_logprobs
        if top is not None and not request.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", param="top_logprobs")
        if top is not None and not 0 <= top <= _MAX_TOP_LOGPROBS:
            raise bad_request(
                f"top_logprobs must be in [0, {_MAX_TOP_LOGPROBS}], got {top}", param="top_logprobs"
            )
        return (top or 0) if request.logprobs else None

    async def create(self, request: ChatCompletionRequest) -> dict[str, Any]:
        model = self._serving.resolve_model(request.model)
        request_id, stream = self.submit(request)
        [result] = await self._serving.collect([stream])
        choices = [
            {
                "index": sample.index,
                "message": {"role": "assistant", "content": sample.text, "tool_calls": []},
                "logprobs": self._logprobs(sample.logprobs),
                "finish_reason": sample.finish_reason,
                "stop_reason": sample.stop_reason,
            }
            for sample in result.samples
        ]
        num_generated = sum(len(s.token_ids) for s in result.samples)
        return {
            "id": request_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": usage([result], num_generated),
        }

    def stream(self, request: ChatCompletionRequest) -> EventStream:
        """Validate and submit now, so that errors are HTTP errors; then the events stream."""
        model = self._serving.resolve_model(request.model)
        request_id, stream = self.submit(request)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        events = self._events(request_id, model, request.n, [stream], include_usage)
        return EventStream(events, [stream])

    async def _events(
        self, request_id: str, model: str, n: int, streams: list[Any], include_usage: bool
    ) -> AsyncIterator[str]:
        chunk = ChunkWriter(request_id, "chat.completion.chunk", model, include_usage)
        result = Result([], 0, [])
        num_generated = 0

        try:
            yield chunk(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    for i in range(n)
                ]
            )
            async for _, delta in merge(streams):
                result = Result(delta.prompt_token_ids, delta.num_cached_tokens, [])
                choices = []
                for change in delta.samples:
                    num_generated += len(change.token_ids)
                    if not (change.text or change.finish_reason or change.logprobs):
                        continue  # tokens whose text is held back (a stop string may follow)
                    choices.append(
                        {
                            "index": change.index,
                            "delta": {"content": change.text} if change.text else {},
                            "logprobs": self._logprobs(change.logprobs),
                            "finish_reason": change.finish_reason,
                            "stop_reason": change.stop_reason,
                        }
                    )
                if choices:
                    yield chunk(choices)
            if include_usage:
                yield chunk([], usage([result], num_generated))
        except Exception as error:  # noqa: BLE001 - one request fails; the stream ends cleanly
            yield sse(api_error(error).body())
        yield DONE

    def _logprobs(self, logprobs: list[TokenLogprob] | None) -> Any:
        if logprobs is None:
            return None
        tokenizer = self._serving.tokenizer

        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = tokenizer.decode([token_id], skip_special_tokens=False)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {
            "content": [
                {
                    **entry(e.token_id, e.logprob),
                    "top_logprobs": [
                        entry(t, lp) for t, lp in zip(e.top_token_ids, e.top_logprobs, strict=True)
                    ],
                }
                for e in logprobs
            ],
            "refusal": None,
        }
