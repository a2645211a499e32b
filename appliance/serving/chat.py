"""POST /v1/chat/completions: messages (+ tools, response_format, chat_template_kwargs) → the
model's chat template → choices with a `message`, or `chat.completion.chunk` events with `delta`s:

    {"delta": {"role": "assistant", "content": ""}}     first chunk of each choice
    {"delta": {"reasoning_content": "Hmm"}}              a thinking model's reasoning
    {"delta": {"content": "Par"}}                         ...
    {"delta": {"tool_calls": [{"index": 0, "id": ..., "function": {"name": ..., "arguments": ""}}]}}
    {"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\""}}]}}
    {"delta": {}, "finish_reason": "stop" | "length" | "tool_calls"}
    {"choices": [], "usage": {...}}                       with stream_options.include_usage
    [DONE]

`plan()` makes every decision before the engine sees the request (400s naming the field): the
prompt, the grammar (response_format, structured_outputs, a forced tool call) and how the answer
is read (chat_output.py). The API routes, the browser UI and any other front end (Ollama's
/api/chat translates to a ChatCompletionRequest) come through here and get all of it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import hearth.appliance.serving.reasoning as reasoning
import hearth.appliance.serving.tool_parsers as tool_parsers
from hearth.appliance.auth.call import CallRecord, current_call
from hearth.appliance.protocol import ChatCompletionRequest, bad_request
from hearth.appliance.request_stream import RequestStream
from hearth.appliance.serving.chat_output import MessageDelta, OutputPlan
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
from hearth.appliance.serving.structured import structured_output
from hearth.appliance.serving.tokens import chat_prompt, messages_for_template
from hearth.appliance.serving.tools import ToolPlan, inline_tools, plan_tools
from hearth.engine.outputs import TokenLogprob
from hearth.engine.prepare import PreparedRequest

_MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class ChatPlan:
    """A checked chat request: what the engine runs, and how its answers are read."""

    prepared: PreparedRequest
    output: OutputPlan


@dataclass
class ChunkStream:
    """A streamed chat completion as chunk bodies (dicts); `close()` aborts what still runs."""

    request_id: str
    chunks: AsyncIterator[dict[str, Any]]
    streams: list[RequestStream]

    def close(self) -> None:
        for stream in self.streams:
            stream.close()


class ChatServing:
    def __init__(self, serving: Serving, tool_call_parser: str = "auto",
                 reasoning_parser: str = "auto") -> None:
        """`tool_call_parser` / `reasoning_parser`: a family name, "none", or "auto" (read off
        the model's chat template)."""
        self._serving = serving
        self._tool_call_parser = tool_call_parser
        self._reasoning_parser = reasoning_parser

    # ---- checking and planning ----

    @cached_property
    def _template(self) -> str | None:
        return getattr(self._serving.tokenizer, "chat_template", None)

    @cached_property
    def _template_knows_tools(self) -> bool:
        return "tools" in reasoning.template_variables(self._template)

    @cached_property
    def tool_family(self) -> str | None:
        """The tool-call format answers are parsed in (None: tool calls are not parsed)."""
        choice = self._tool_call_parser
        if choice == "none":
            return None
        if choice != "auto":
            return tool_parsers.ALIASES.get(choice, choice)
        return tool_parsers.detect(self._template) if self._template_knows_tools else "hermes"

    @cached_property
    def parses_reasoning(self) -> bool:
        if self._reasoning_parser == "auto":
            return reasoning.detect(self._template)
        return self._reasoning_parser != "none"

    def prepare(
        self, request: ChatCompletionRequest, fit_max_tokens: bool = False
    ) -> PreparedRequest:
        """Every check before the engine sees the request (400s naming the field)."""
        return self.plan(request, fit_max_tokens).prepared

    def plan(self, request: ChatCompletionRequest, fit_max_tokens: bool = False) -> ChatPlan:
        serving = self._serving
        serving.reject_unsupported(request, [
            ("functions", bool(request.functions), "functions (deprecated: send tools)"),
            ("function_call", request.function_call not in (None, "none"),
             "function_call (deprecated: send tool_choice)"),
            ("audio", request.audio is not None, "audio"),
            ("modalities", request.modalities not in (None, ["text"]), "modalities but text"),
            ("prediction", request.prediction is not None, "prediction"),
            ("web_search_options", request.web_search_options is not None, "web_search_options"),
        ])
        tools = plan_tools(request, self.tool_family or "hermes")
        constraint = structured_output(request)
        if constraint is not None and tools.constraint is not None:
            raise bad_request(f"tool_choice {tools.mode!r} forces a tool call; it cannot be "
                              f"combined with {constraint.source}", param=constraint.source)
        constraint = constraint or tools.constraint
        prompt = self._prompt(request, tools, constrained=constraint is not None)
        special = tools.mode == "auto" and tools.parser in tool_parsers.NEEDS_SPECIAL_TOKENS
        max_tokens = request.max_completion_tokens
        if max_tokens is None:
            max_tokens = request.max_tokens
        params = serving.sampling_params(request, max_tokens, self._num_logprobs(request),
                                         constraint, skip_special_tokens=False if special else None)
        prepared = serving.prepare(prompt, params, "messages", fit_max_tokens)
        thinking = self.parses_reasoning and constraint is None
        output = OutputPlan(
            tool_parser=tools.parser if tools.mode != "none" else None,
            tool_name=tools.name,
            reasoning=thinking,
            starts_in_reasoning=thinking and reasoning.starts_inside(prompt.text or ""),
            drop=self._eos_texts() if special else (),
            parallel_tool_calls=tools.parallel,
        )
        return ChatPlan(prepared, output)

    def _prompt(self, request: ChatCompletionRequest, tools: ToolPlan, constrained: bool):
        kwargs = reasoning.template_kwargs(request.chat_template_kwargs, request.reasoning_effort,
                                           self._template, constrained)
        messages = messages_for_template(request.messages)
        if self._template_knows_tools:
            if tools.tools is not None:
                kwargs["tools"] = tools.tools
        elif tools.tools is not None or any(m.get("tool_calls") or m["role"] == "tool"
                                            for m in messages):
            messages = inline_tools(messages, tools.tools)
        return chat_prompt(self._serving.tokenizer, messages, request.add_generation_prompt,
                           limit_to=self._serving, **kwargs)

    def _eos_texts(self) -> tuple[str, ...]:
        tokenizer = self._serving.tokenizer
        ids = getattr(tokenizer, "eos_token_ids", ())
        return tuple(t for t in (tokenizer.decode([i], skip_special_tokens=False) for i in ids)
                     if t)

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

    # ---- running ----

    def submit(
        self, request: ChatCompletionRequest, fit_max_tokens: bool = False,
        origin: str = "chatcmpl", call: CallRecord | None = None,
    ) -> tuple[str, RequestStream]:
        """Check and start a chat completion: its id and its stream of raw deltas. The browser
        UI's chat tab (origin "ui", as the monitor shows it) comes here, with `call`: its
        session key's call (Auth.open_ui_call), as the gate sets it for an API call."""
        token = current_call.set(call) if call is not None else None
        try:
            request_id, stream, _ = self._start(request, fit_max_tokens, origin)
        finally:
            if token is not None:
                current_call.reset(token)
        return request_id, stream

    def _start(self, request: ChatCompletionRequest, fit_max_tokens: bool = False,
               origin: str = "chatcmpl", plan: ChatPlan | None = None
               ) -> tuple[str, RequestStream, ChatPlan]:
        plan = plan or self.plan(request, fit_max_tokens)
        request_id = f"{origin}-{uuid.uuid4().hex}"
        [stream] = self._serving.submit(request_id, [plan.prepared], request.priority)
        return request_id, stream, plan

    async def create(self, request: ChatCompletionRequest,
                     plan: ChatPlan | None = None) -> dict[str, Any]:
        """`plan`: `plan(request)`, when the caller ran it off the event loop."""
        model = self._serving.resolve_model(request.model)
        request_id, stream, plan = self._start(request, plan=plan)
        [result] = await self._serving.collect([stream])
        choices = []
        for sample in result.samples:
            output = plan.output.choice()
            choices.append({
                "index": sample.index,
                "message": output.message(sample.text),
                "logprobs": self._logprobs(sample.logprobs),
                "finish_reason": output.finish_reason(sample.finish_reason),
                "stop_reason": sample.stop_reason,
            })
        num_generated = sum(len(s.token_ids) for s in result.samples)
        return {
            "id": request_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": usage([result], num_generated),
        }

    def stream(self, request: ChatCompletionRequest, plan: ChatPlan | None = None) -> EventStream:
        """Validate and submit now, so that errors are HTTP errors; then the SSE events."""
        chunks = self.open_chunks(request, plan)
        return EventStream(self._events(chunks.chunks), chunks.streams)

    def open_chunks(self, request: ChatCompletionRequest,
                    plan: ChatPlan | None = None) -> ChunkStream:
        """Validate and submit now; then the streamed chunks as dicts (for other front ends)."""
        model = self._serving.resolve_model(request.model)
        request_id, stream, plan = self._start(request, plan=plan)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        writer = ChunkWriter(request_id, "chat.completion.chunk", model, include_usage)
        chunks = self._chunks(writer, request.n, stream, plan.output)
        return ChunkStream(request_id, chunks, [stream])

    async def _events(self, chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield sse(chunk)
        except Exception as error:  # noqa: BLE001 - one request fails; the stream ends cleanly
            yield sse(api_error(error).body())
        yield DONE

    async def _chunks(self, chunk: ChunkWriter, n: int, stream: RequestStream,
                      plan: OutputPlan) -> AsyncIterator[dict[str, Any]]:
        outputs = [plan.choice() for _ in range(n)]
        result = Result([], 0, [])
        num_generated = 0
        yield chunk.body([{"index": i, "delta": {"role": "assistant", "content": ""},
                           "logprobs": None, "finish_reason": None} for i in range(n)])
        async for _, delta in merge([stream]):
            result = Result(delta.prompt_token_ids, delta.num_cached_tokens, [])
            choices = []
            for change in delta.samples:
                num_generated += len(change.token_ids)
                output = outputs[change.index]
                parts = output.feed(change.text)
                if change.finish_reason:
                    _extend(parts, output.finish())
                reason = output.finish_reason(change.finish_reason)
                if not (parts.as_delta() or reason or change.logprobs):
                    continue  # text held back (a stop string or a marker may follow)
                choices.append({"index": change.index, "delta": parts.as_delta(),
                                "logprobs": self._logprobs(change.logprobs),
                                "finish_reason": reason, "stop_reason": change.stop_reason})
            if choices:
                yield chunk.body(choices)
        if chunk.include_usage:
            yield chunk.body([], usage([result], num_generated))

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


def _extend(parts: MessageDelta, more: MessageDelta) -> None:
    parts.reasoning += more.reasoning
    parts.content += more.content
    parts.tool_calls += more.tool_calls
