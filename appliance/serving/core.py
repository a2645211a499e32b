"""What the endpoints share: model names, SamplingParams from a request, prompt checks (the
engine's own `prepare`, run here so that a bad prompt is a 400 before any response starts),
running requests (collected or streamed), SSE framing, usage, /v1/models.

Endpoint specifics live beside it: `completion.py`, `chat.py`, `tokens.py` (chat template,
/tokenize, /detokenize).
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from hearth.appliance.async_engine import AsyncEngine
from hearth.appliance.auth.call import current_call
from hearth.appliance.auth.keyring import SINGLE_KEY_NAME
from hearth.appliance.deltas import RequestDelta, SampleDelta
from hearth.appliance.protocol import APIError, UnknownFieldLog, bad_request
from hearth.appliance.request_limits import check_request_limits
from hearth.appliance.request_stream import (
    EngineUnavailableError,
    QueueFullError,
    RequestFailedError,
    RequestStream,
)
from hearth.appliance.serving.capabilities import SERVER_FEATURES, ServerFeatures, capabilities
from hearth.appliance.serving.structured import logit_bias
from hearth.appliance.tokenize_pool import TokenizePool
from hearth.engine.outputs import TokenLogprob
from hearth.engine.prepare import (
    ModelInfo,
    PreparedRequest,
    TextCodec,
    check_prompt_chars,
    prepare,
)
from hearth.engine.sampling_params import SamplingParams
from hearth.engine.structured_output import StructuredOutput, StructuredOutputError

T = TypeVar("T")
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
    "logit_bias",
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


_NO_REASONS = '"finish_reason":null,"stop_reason":null'

@dataclass(frozen=True)
class ChunkWriter:
    """The SSE chunks of one streamed response: the fields every chunk repeats, fixed once."""

    request_id: str
    object: str  # "chat.completion.chunk" or "text_completion"
    model: str
    include_usage: bool
    created: int = field(default_factory=lambda: int(time.time()))

    def __call__(self, choices: list[dict[str, Any]], usage: Any = None) -> str:
        return sse(self.body(choices, usage))

    def text_choice(self, index: int, text: str, finish_reason: str | None,
                    stop_reason: str | int | None) -> str:
        """`self([{index, text, logprobs: None, finish_reason, stop_reason}])`, the same bytes,
        without building the dicts: each streamed token of /v1/completions comes here."""
        encode = _ENCODER.encode
        reasons = (_NO_REASONS if finish_reason is None and stop_reason is None  # all but the last
                   else f'"finish_reason":{encode(finish_reason)},'
                        f'"stop_reason":{encode(stop_reason)}')
        return (f'{self._head}[{{"index":{index},"text":{encode(text)},"logprobs":null,'
                f'{reasons}}}]{self._tail}')

    @functools.cached_property
    def _head(self) -> str:
        encode = _ENCODER.encode
        return (f'data: {{"id":{encode(self.request_id)},"object":{encode(self.object)},'
                f'"created":{encode(self.created)},"model":{encode(self.model)},"choices":')

    @functools.cached_property
    def _tail(self) -> str:
        return ',"usage":null}\n\n' if self.include_usage else "}\n\n"

    def body(self, choices: list[dict[str, Any]], usage: Any = None) -> dict[str, Any]:
        body = {"id": self.request_id, "object": self.object, "created": self.created,
                "model": self.model, "choices": choices}
        if self.include_usage:
            body["usage"] = usage
        return body


# One encoder for every chunk: json.dumps with options builds a new one per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def sse(data: dict[str, Any]) -> str:
    return f"data: {_ENCODER.encode(data)}\n\n"


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
    first = message.split(" ", 1)[0].rstrip(":")
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

    def __init__(self, engine: AsyncEngine, served_names: tuple[str, ...],
                 features: ServerFeatures = SERVER_FEATURES,
                 pool: TokenizePool | None = None) -> None:
        self.engine = engine
        self._served_names = served_names
        self.features = features  # what capabilities() may advertise (--reasoning-parser)
        self.unknown_fields = UnknownFieldLog()  # the routes log unknown request fields here
        self.pool = pool or TokenizePool()

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the tokenize pool (appliance/tokenize_pool.py), off the event loop:
        parsing, chat templates, tokenizing and grammar compiling of one request."""
        return await self.pool.run(fn, *args)

    # ---- models ----

    @property
    def model(self) -> ModelInfo:
        return self.engine.model

    @property
    def tokenizer(self) -> TextCodec:
        return self.engine.model.tokenizer

    def model_names(self) -> list[str]:
        return list(self._served_names) or [self.model.name]

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

    def capabilities(self) -> list[str]:
        """What the served model can do on this server (serving/capabilities.py)."""
        return capabilities(self.model, self.features)

    def list_models(self) -> dict[str, Any]:
        created = int(time.time())
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "hearth",
                    "root": self.model.name,
                    "max_model_len": self.model.max_model_len,
                    "capabilities": self.capabilities(),
                }
                for name in self.model_names()
            ],
        }

    # ---- prompts and parameters ----

    def prepare(self, prompt: Prompt, params: SamplingParams, where: str,
                fit_max_tokens: bool = False) -> PreparedRequest:
        """The engine's checks (engine/prepare.py), early: a 400 that says the numbers, never a
        truncation. `where` names the prompt ("prompt[2]"; "messages" for a chat), and its
        field is the error's param. `fit_max_tokens` lowers max_tokens to what the context has
        room for (the chat UI's slider), instead of refusing."""
        param = where.split("[", 1)[0]
        room = self.model.max_model_len - len(prompt.token_ids)
        if fit_max_tokens and params.max_tokens is not None and room >= 1:
            params = replace(params, max_tokens=min(params.max_tokens, room))
        label = "the chat prompt" if param == "messages" else where
        try:
            return prepare(self.model, prompt.token_ids, params, label)
        except StructuredOutputError as error:
            raise bad_request(str(error), param=error.field) from None
        except ValueError as error:
            message = str(error)
            raise bad_request(message, param=_param_of(message) or param) from None

    def check_chars(self, text: str, where: str) -> None:
        """400 for a text too long to fit the context, found by its length before tokenizing
        (engine/prepare.py's bound): a huge prompt costs no tokenizer time."""
        try:
            check_prompt_chars(self.model, text, where)
        except ValueError as error:
            raise bad_request(str(error), param=where.split("[", 1)[0]) from None

    def sampling_params(
        self, request: Any, max_tokens: int | None, logprobs: int | None,
        structured_output: StructuredOutput | None = None, skip_special_tokens: bool | None = None,
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
                skip_special_tokens=value(skip_special_tokens, request.skip_special_tokens),
                logit_bias=logit_bias(request.logit_bias),
                structured_output=structured_output,
            )
        except ValueError as error:
            raise bad_request(str(error), param=_param_of(str(error))) from None

    def reject_unsupported(self, request: Any, checks: list[tuple[str, bool, str]]) -> None:
        """`checks`: (param, "set to something this server cannot do", what to call it)."""
        check_request_limits(request)
        for param, unsupported, what in checks:
            if unsupported:
                raise bad_request(f"{what} is not supported by this server", param=param)
        if request.stream_options is not None and not request.stream:
            raise bad_request(
                "stream_options is only allowed when stream is true", param="stream_options"
            )

    # ---- running ----

    def submit(
        self, request_id: str, requests: list[PreparedRequest], priority: int
    ) -> list[RequestStream]:
        """Start every request, or none (admission is all-or-nothing). Under an API key (the
        gate's CallRecord), the requests join the key's fair-share flow at its priority: under a
        named key from the keys file, the body's `priority` may only lower the request's
        precedence (a negative one counts as 0), so no client jumps ahead of its key's priority
        and of the other keys. The single `--api-key` ("default") keeps the body's priority."""
        call = current_call.get()
        self.engine.check_admission(len(requests), call.key if call is not None else None)
        if call is not None:
            requests = [replace(r, share_key=call.key, share_weight=call.weight) for r in requests]
            if call.key != SINGLE_KEY_NAME:
                priority = max(priority, 0)
            priority += call.priority
        streams = [
            self.engine.submit(f"{request_id}-{i}", request, priority)
            for i, request in enumerate(requests)
        ]
        for stream, request in zip(streams, requests, strict=True):
            stream.num_prompt_tokens = len(request.token_ids)
        if call is not None:
            call.streams.extend(streams)
        return streams

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
