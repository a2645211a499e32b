"""One chat choice's generated text → reasoning_content, content and tool calls: OpenAI's
`delta`s while streaming, its `message` when whole. Both go through the same parsers.

    text ─► ThinkParser (reasoning.py) ─► reasoning_content
                 └─ content ─► ToolCallParser (tool_parsers.py) ─► content, tool_calls
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hearth.appliance.serving.json_stream import merge_call_deltas
from hearth.appliance.serving.reasoning import ThinkParser
from hearth.appliance.serving.tool_parsers import ToolCallParser, make_parser, partial_suffix


@dataclass(frozen=True)
class OutputPlan:
    """How a chat request's answers are read: made once per request, a ChoiceOutput per choice."""

    tool_parser: str | None = None  # None: no tool calls to look for
    tool_name: str | None = None  # the named function of a forced call
    reasoning: bool = False  # split <think> blocks into reasoning_content
    starts_in_reasoning: bool = False  # the prompt opened the <think> block
    drop: tuple[str, ...] = ()  # special-token texts to remove (kept for a parser's markers)
    parallel_tool_calls: bool = True

    def choice(self) -> ChoiceOutput:
        tools = make_parser(self.tool_parser, self.tool_name) if self.tool_parser else None
        think = ThinkParser(self.starts_in_reasoning) if self.reasoning else None
        return ChoiceOutput(think, tools, self.drop, self.parallel_tool_calls)


@dataclass
class MessageDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def as_delta(self) -> dict[str, Any]:
        """The non-empty parts, as a streamed chunk's `delta`."""
        delta: dict[str, Any] = {}
        if self.reasoning:
            delta["reasoning_content"] = self.reasoning
        if self.content:
            delta["content"] = self.content
        if self.tool_calls:
            delta["tool_calls"] = self.tool_calls
        return delta


class ChoiceOutput:
    def __init__(self, think: ThinkParser | None, tools: ToolCallParser | None,
                 drop: tuple[str, ...] = (), parallel: bool = True) -> None:
        self._think = think
        self._tools = tools
        self._drop = drop
        self._parallel = parallel
        self._pending = ""  # text that may be the start of a dropped special token
        self.has_reasoning_parser = think is not None

    @property
    def num_tool_calls(self) -> int:
        return self._tools.num_calls if self._tools is not None else 0

    def feed(self, text: str) -> MessageDelta:
        if self._drop:
            text = self._without_specials(self._pending + text)
            keep = max(partial_suffix(text, special) for special in self._drop)
            text, self._pending = text[:len(text) - keep], text[len(text) - keep:]
        return self._split(text, final=False)

    def finish(self) -> MessageDelta:
        text, self._pending = self._pending, ""
        return self._split(text, final=True)

    def _without_specials(self, text: str) -> str:
        for special in self._drop:
            text = text.replace(special, "")
        return text

    def finish_reason(self, reason: str | None) -> str | None:
        """OpenAI's reason for an answer that called tools is "tool_calls"."""
        return "tool_calls" if reason == "stop" and self.num_tool_calls else reason

    def message(self, text: str) -> dict[str, Any]:
        """The whole answer as OpenAI's `message`."""
        whole = self.feed(text)
        last = self.finish()
        calls = merge_call_deltas(whole.tool_calls + last.tool_calls)
        content = whole.content + last.content
        message: dict[str, Any] = {"role": "assistant",
                                   "content": content if content or not calls else None,
                                   "tool_calls": calls}
        if self.has_reasoning_parser:
            message["reasoning_content"] = (whole.reasoning + last.reasoning) or None
        return message

    def _split(self, text: str, final: bool) -> MessageDelta:
        out = MessageDelta()
        if self._think is not None:
            split = self._think.feed(text)
            out.reasoning, text = split.reasoning, split.content
            if final:
                rest = self._think.finish()
                out.reasoning += rest.reasoning
                text += rest.content
        if self._tools is None:
            out.content = text
            return out
        parsed = self._tools.feed(text)
        if final:
            parsed.add(self._tools.finish())
        out.content = parsed.content
        out.tool_calls = [d for d in parsed.tool_calls if self._parallel or d["index"] == 0]
        return out
