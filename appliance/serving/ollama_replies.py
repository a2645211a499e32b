"""OpenAI chunks → Ollama replies: NDJSON lines while streaming, one object with stream: false.

    /api/chat      {"model", "created_at", "message": {"role": "assistant", "content": "Par"},
                    "done": false}
    /api/generate  {"model", "created_at", "response": "Par", "done": false}
    last line      the same with empty text, "done": true, "done_reason": "stop" | "length",
                   total_duration, load_duration, prompt_eval_count, prompt_eval_duration,
                   eval_count, eval_duration (nanoseconds)

Reasoning (`reasoning_content`) becomes `thinking`; streamed tool-call fragments are gathered and
sent whole, with parsed arguments, in the line before the last, as Ollama sends them.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from hearth.appliance.ollama_protocol import OllamaError


async def openai_chunks(events: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    """The JSON payloads of an OpenAI SSE stream, up to [DONE]."""
    async for event in events:
        data = event.removeprefix("data: ").strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def created_at() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass
class ReplyWriter:
    """One request's Ollama reply, fed the OpenAI chunks one by one."""

    model: str
    chat: bool  # the /api/chat shape, else /api/generate's
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    content: list[str] = field(default_factory=list)
    thinking: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, str]] = field(default_factory=dict)
    done_reason: str = "stop"
    usage: dict[str, Any] = field(default_factory=dict)

    def feed(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        """Take one OpenAI chunk; the line to stream for it, if it carries text."""
        if "error" in chunk:
            error = chunk["error"]
            raise OllamaError(500, error.get("message", str(error)))
        self.usage = chunk.get("usage") or self.usage
        text, thinking = "", ""
        for choice in chunk.get("choices", []):
            delta = choice.get("delta") or {}
            text += choice.get("text") or delta.get("content") or ""
            thinking += delta.get("reasoning_content") or ""
            for call in delta.get("tool_calls") or []:
                self._gather(call)
            if choice.get("finish_reason") == "length":
                self.done_reason = "length"
        if not (text or thinking):
            return None
        self.first_token = self.first_token or time.perf_counter()
        self.content.append(text)
        self.thinking.append(thinking)
        return self._line(text, thinking)

    def last_lines(self) -> list[dict[str, Any]]:
        """What follows the text when streaming: the tool calls, if any, and the done line."""
        calls = self._calls()
        lines = [self._line("", "", calls)] if calls else []
        return [*lines, self._done(self._line("", ""))]

    def whole(self) -> dict[str, Any]:
        """The stream: false reply: all text in one object, with the done fields."""
        return self._done(self._line("".join(self.content), "".join(self.thinking), self._calls()))

    def _gather(self, call: dict[str, Any]) -> None:
        gathered = self.tool_calls.setdefault(call.get("index", 0), {"name": "", "arguments": ""})
        function = call.get("function") or {}
        gathered["name"] += function.get("name") or ""
        gathered["arguments"] += function.get("arguments") or ""

    def _calls(self) -> list[dict[str, Any]]:
        return [
            {"function": {"name": call["name"], "arguments": _arguments(call["arguments"])}}
            for _, call in sorted(self.tool_calls.items())
        ]

    def _line(self, text: str, thinking: str, calls: list | None = None) -> dict[str, Any]:
        line: dict[str, Any] = {"model": self.model, "created_at": created_at()}
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = calls
            line["message"] = message
        else:
            line["response"] = text
            if thinking:
                line["thinking"] = thinking
        line["done"] = False
        return line

    def _done(self, line: dict[str, Any]) -> dict[str, Any]:
        now = time.perf_counter()
        first = self.first_token or now
        line.update(
            done=True,
            done_reason=self.done_reason,
            total_duration=_ns(now - self.started),
            load_duration=0,  # the model is loaded once, at startup
            prompt_eval_count=self.usage.get("prompt_tokens", 0),
            prompt_eval_duration=_ns(first - self.started),
            eval_count=self.usage.get("completion_tokens", 0),
            eval_duration=_ns(now - first),
        )
        return line


def load_reply(model: str, chat: bool) -> dict[str, Any]:
    """Ollama's answer to a request with nothing to generate (clients send one to load a model):
    the model is loaded already."""
    writer = ReplyWriter(model, chat)
    line = writer._line("", "")
    line.update(done=True, done_reason="load")
    return line


def _arguments(text: str) -> Any:
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        return text  # not JSON: handed on as the model wrote it


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))
