"""Reasoning models: `<think>…</think>` in the answer → `reasoning_content`, and the chat
template's switches for thinking.

    Qwen3, QwQ, DeepSeek-R1 and their distills write   <think>reasoning</think>answer
    (or the prompt already opened <think>, as DeepSeek-R1's template does)

ThinkParser splits a streamed answer into reasoning and content, holding back text that could
still be a `<think>` / `</think>` marker; the markers themselves reach neither. `template_kwargs`
gives the template its `chat_template_kwargs`, with `reasoning_effort` mapped onto what the
template reads (`reasoning_effort` itself, or Qwen3's `enable_thinking`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.meta

from hearth.appliance.protocol import bad_request
from hearth.appliance.serving.tool_parsers import partial_suffix

PARSERS = ("think",)
ALIASES = {"qwen3": "think", "deepseek_r1": "think", "deepseek-r1": "think"}
START, END = "<think>", "</think>"
# Names the renderer sets itself: chat_template_kwargs may not replace them.
_RESERVED = frozenset({"messages", "add_generation_prompt", "bos_token", "eos_token", "tools"})
_NO_THINKING = ("none", "minimal")


def detect(chat_template: str | None) -> bool:
    """Whether a chat template is a thinking model's (it writes or strips <think> blocks)."""
    return bool(chat_template) and (START in chat_template or END in chat_template)


def starts_inside(prompt: str) -> bool:
    """The prompt itself opened a <think> block (the answer starts in the reasoning)."""
    return prompt.rfind(START) > prompt.rfind(END)


@lru_cache(maxsize=8)
def template_variables(chat_template: str | None) -> frozenset[str]:
    """The variables a chat template reads from outside (its own `set`s excluded)."""
    if not chat_template:
        return frozenset()
    try:
        ast = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(chat_template)
    except jinja2.TemplateError:
        return frozenset()
    return frozenset(jinja2.meta.find_undeclared_variables(ast))


def template_kwargs(chat_template_kwargs: dict[str, Any] | None, reasoning_effort: str | None,
                    chat_template: str | None, constrained: bool) -> dict[str, Any]:
    """Extra variables for the chat template. A request whose output a grammar constrains
    starts answering at once: a thinking template is told not to think (unless asked to)."""
    kwargs = dict(chat_template_kwargs or {})
    clash = sorted(_RESERVED & kwargs.keys())
    if clash:
        raise bad_request(f"chat_template_kwargs may not set {', '.join(clash)}; use the "
                          "request's own fields", param="chat_template_kwargs")
    names = template_variables(chat_template)
    if reasoning_effort is not None and "reasoning_effort" in names:
        kwargs.setdefault("reasoning_effort", reasoning_effort)
    if "enable_thinking" in names:
        if reasoning_effort is not None:
            kwargs.setdefault("enable_thinking", reasoning_effort not in _NO_THINKING)
        if constrained:
            kwargs.setdefault("enable_thinking", False)
    return kwargs


@dataclass
class Split:
    reasoning: str = ""
    content: str = ""


class ThinkParser:
    """Streamed answer → reasoning and content. `inside`: the prompt opened the block."""

    def __init__(self, inside: bool = False) -> None:
        self._mode = "reasoning" if inside else "start"  # then "content_start", "content"
        self._buf = ""

    def feed(self, text: str) -> Split:
        self._buf += text
        out = Split()
        while self._step(out):
            pass
        return out

    def finish(self) -> Split:
        out = Split()
        if self._mode == "reasoning":
            out.reasoning = self._buf  # cut off while thinking
        elif self._mode != "content_start":
            out.content = self._buf
        self._buf = ""
        return out

    def _step(self, out: Split) -> bool:
        if self._mode == "start":
            head = self._buf.lstrip()
            if not head or (START.startswith(head) and head != START):
                return False  # could still be <think>
            if head.startswith(START):
                self._mode, self._buf = "reasoning", head[len(START):]
            else:
                self._mode = "content"
            return True
        if self._mode == "reasoning":
            at = self._buf.find(END)
            keep = partial_suffix(self._buf, END) if at < 0 else 0
            end = at if at >= 0 else len(self._buf) - keep
            out.reasoning += self._buf[:end]
            self._buf = self._buf[end + len(END):] if at >= 0 else self._buf[end:]
            if at >= 0:
                self._mode = "content_start"
            return at >= 0
        if self._mode == "content_start":  # the blank lines after </think> are no content
            self._buf = self._buf.lstrip()
            if not self._buf:
                return False
            self._mode = "content"
        out.content += self._buf
        self._buf = ""
        return False
