"""OpenAI ↔ engine translation shared by the endpoints: model names, SamplingParams, prompt checks,
running requests (collected or streamed), SSE framing, usage, /v1/models.

Endpoint specifics live beside it: `serving_completion.py`, `serving_chat.py`, `serving_tokens.py`
(chat template, /tokenize, /detokenize). Prompts are tokenized here, so that an over-long prompt
is a 400 that says the numbers before any response starts.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from hearth.appliance.async_engine import AsyncEngine
from hearth.appliance.deltas import RequestDelta, SampleDelta
from hearth.appliance.engine_types import (
    EngineUnavailableError,
    QueueFullError,
    RequestFailedError,
    RequestStream,
)
from hearth.appliance.protocol import APIError, bad_request
from hearth.engine.outputs import TokenLogprob
from hearth.engine.sampling_params import SamplingParams

DONE = "data: [DONE]\n\n"
_PARAM_FIELDS = {
    "n",
    "max_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "seed",
    "stop",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "stop_token_ids",
}


@dataclass
class Prompt:
    """One prompt, tokenized; `text` is what `echo` repeats (None: not needed yet)."""

    text: str | None
    token_ids: list[int]


@dataclass
class Sample:
    """One finished sample (non-streaming answers)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass
class Result:
    prompt_token_ids: list[int]
    num_cached_tokens: int
    samples: list[Sample]


@dataclass
class EventStream:
    """SSE events of submitted requests. `close()` aborts whatever is still running, also when the
    response never started iterating `events` (client gone before the headers went out)."""

    events: AsyncIterator[str]
    streams: list[RequestStream]

    def close(self) -> None:
        for stream in self.streams:
            stream.close()


@dataclass(frozen=True)
class ChunkWriter:
    """The SSE chunks of one streamed response: the fields every chunk repeats, fixed once."""

    request_id: str
    object: str  # "chat.completion.chunk" or "text_completion"
    model: str
    include_usage: bool
    created: int = field(default_factory=lambda: int(time.time()))

    def __call__(self, choices: list[dict[str, Any]], usage: Any = None) -> str:
        body = {"id": self.request_id, "object": self.object, "created": self.created,
                "model": self.model, "choices": choices}
        if self.include_usage:
            body["usage"] = usage
        return sse(body)


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def api_error(error: BaseException) -> APIError:
    """The OpenAI-format answer for an exception raised while serving a request."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, QueueFullError):
        return APIError(
            429,
            str(error),
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(error.retry_after_s)},
        )
    if isinstance(error, EngineUnavailableError):
        return APIError(503, str(error), type="service_unavailable", code="unavailable")
    if isinstance(error, ValueError):
        return bad_request(str(error), param=_param_of(str(error)))
    if isinstance(error, RequestFailedError):
        return APIError(500, f"the request failed: {error}", type="server_error")
    return APIError(500, f"internal error: {type(error).__name__}", type="server_error")


def _param_of(message: str) -> str | None:
    first = message.split(" ", 1)[0]
    return first if first in _PARAM_FIELDS else None


def usage(prompts: Sequence[Result], completion_tokens: int) -> dict[str, Any]:
    prompt_tokens = sum(len(r.prompt_token_ids) for r in prompts)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": sum(r.num_cached_tokens for r in prompts)},
    }


class Serving:
    """What both endpoints share. `served_names` empty: the engine's own model name."""

    def __init__(self, engine: AsyncEngine, served_names: tuple[str, ...]) -> None:
        self.engine = engine
        self._served_names = served_names

    # ---- models ----

    def model_names(self) -> list[str]:
        return list(self._served_names) or [self.engine.engine.model_name]

    def resolve_model(self, requested: str | None) -> str:
        names = self.model_names()
        if requested is None or requested in names:
            return requested or names[0]
        raise APIError(
            404,
            f"The model '{requested}' does not exist; this server serves "
            f"{', '.join(repr(n) for n in names)}",
            param="model",
            code="model_not_found",
        )

    def list_models(self) -> dict[str, Any]:
        created = int(time.time())
        max_model_len = self.engine.engine.max_model_len
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "hearth",
                    "root": self.engine.engine.model_name,
                    "max_model_len": max_model_len,
                }
                for name in self.model_names()
            ],
        }

    # ---- prompts and parameters ----

    @property
    def tokenizer(self) -> Any:
        return self.engine.engine.tokenizer

    def check_prompt(self, token_ids: list[int], max_tokens: int | None, where: str) -> None:
        """The engine's own checks, early: a 400 that says the numbers, never a truncation.
        `where` names the prompt in the message ("prompt[2]"); the param is its field."""
        param = where.split("[", 1)[0]
        if not token_ids:
            raise bad_request(f"{where} is empty", param=param)
        vocab_size = self.tokenizer.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab_size]
        if bad:
            raise bad_request(
                f"{where}: token id {bad[0]} is out of the vocabulary [0, {vocab_size})",
                param=param,
            )
        limit = self.engine.engine.max_model_len
        what = "the chat prompt" if param == "messages" else where
        if max_tokens is None and len(token_ids) >= limit:
            raise bad_request(
                f"{what} has {len(token_ids)} tokens; the model's context length is {limit}",
                param=param,
            )
        if max_tokens is not None and len(token_ids) + max_tokens > limit:
            raise bad_request(
                f"{what} has {len(token_ids)} tokens and max_tokens is {max_tokens}; together "
                f"they exceed the model's context length {limit}",
                param=param,
            )

    def sampling_params(
        self, request: Any, max_tokens: int | None, logprobs: int | None
    ) -> SamplingParams:
        def value(x: Any, default: Any) -> Any:
            return default if x is None else x

        stop = (
            request.stop if isinstance(request.stop, list) else [request.stop] * bool(request.stop)
        )
        try:
            return SamplingParams(
                n=request.n,
                max_tokens=max_tokens,
                temperature=value(request.temperature, 1.0),
                top_p=value(request.top_p, 1.0),
                top_k=value(request.top_k, 0),
                min_p=value(request.min_p, 0.0),
                repetition_penalty=value(request.repetition_penalty, 1.0),
                presence_penalty=value(request.presence_penalty, 0.0),
                frequency_penalty=value(request.frequency_penalty, 0.0),
                seed=request.seed,
                stop=stop,
                stop_token_ids=request.stop_token_ids or [],
                ignore_eos=request.ignore_eos,
                logprobs=logprobs,
                include_stop_str_in_output=request.include_stop_str_in_output,
                skip_special_tokens=request.skip_special_tokens,
            )
        except ValueError as error:
            raise bad_request(str(error), param=_param_of(str(error))) from None

    def reject_unsupported(self, request: Any, checks: list[tuple[str, bool, str]]) -> None:
        """`checks`: (param, "set to something this server cannot do", what to call it)."""
        for param, unsupported, what in checks:
            if unsupported:
                raise bad_request(f"{what} is not supported by this server", param=param)
        if request.stream_options is not None and not request.stream:
            raise bad_request(
                "stream_options is only allowed when stream is true", param="stream_options"
            )

    # ---- running ----

    def submit(
        self, request_id: str, prompts: list[Prompt], params: SamplingParams, priority: int
    ) -> list[RequestStream]:
        """Start every prompt, or none (admission is all-or-nothing)."""
        self.engine.check_admission(len(prompts))
        return [
            self.engine.submit(f"{request_id}-{i}", p.token_ids, params, priority)
            for i, p in enumerate(prompts)
        ]

    async def collect(self, streams: list[RequestStream]) -> list[Result]:
        try:
            return list(await asyncio.gather(*(_collect(s) for s in streams)))
        finally:
            for stream in streams:
                stream.close()


async def _collect(stream: RequestStream) -> Result:
    samples: dict[int, Sample] = {}
    prompt_token_ids: list[int] = []
    num_cached = 0
    async for delta in stream:
        prompt_token_ids, num_cached = delta.prompt_token_ids, delta.num_cached_tokens
        for change in delta.samples:
            _accumulate(samples.setdefault(change.index, Sample(change.index)), change)
    return Result(prompt_token_ids, num_cached, [samples[i] for i in sorted(samples)])


def _accumulate(sample: Sample, change: SampleDelta) -> None:
    sample.text += change.text
    sample.token_ids.extend(change.token_ids)
    if change.logprobs is not None:
        sample.logprobs = (sample.logprobs or []) + change.logprobs
    sample.finish_reason = change.finish_reason or sample.finish_reason
    sample.stop_reason = change.stop_reason if change.finish_reason else sample.stop_reason


async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestDelta]]:
    """Deltas of several streams as they come, tagged with the stream's position. Closing the
    iterator (client gone) aborts every stream still running."""
    if len(streams) == 1:
        try:
            async for delta in streams[0]:
                yield 0, delta
        finally:
            streams[0].close()
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(position: int, stream: RequestStream) -> None:
        try:
            async for delta in stream:
                queue.put_nowait((position, delta))
            queue.put_nowait((position, None))
        except Exception as error:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((position, error))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            position, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield position, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.close()
