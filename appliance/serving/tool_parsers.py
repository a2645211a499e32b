"""Tool calls in a model's own output format → OpenAI tool calls, streamed or whole.

    hermes       Hermes / Qwen 2.5+ / Qwen3 (and the prompt Hearth adds for templates that know
                 no tools):      <tool_call>{"name": ..., "arguments": {...}}</tool_call>, repeated
    llama3_json  Llama 3.1-3.3:  {"name": ..., "parameters": {...}} (after an optional
                 <|python_tag|>), several separated by ";"
    mistral      Mistral:        [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...] or, with
                 newer tokenizers, [TOOL_CALLS]name[ARGS]{...}
    required     a forced call (tool_choice "required"): [{"name": ..., "parameters": {...}}, ...]
    named        a forced call of one function: the text is its arguments object

Each parser is fed the answer's text as it streams and returns content and tool-call deltas. Text
that could still turn into a tool-call marker is held back, so markup never reaches `content`;
text in a marker that turns out to hold no call is given back as content. The family comes from
the chat template (`detect`), or from `--tool-call-parser`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hearth.appliance.serving.json_stream import CallScanner, ObjectSplitter

PARSERS = ("hermes", "llama3_json", "mistral")
ALIASES = {"qwen": "hermes", "qwen3": "hermes", "llama3": "llama3_json", "llama": "llama3_json"}
NEEDS_SPECIAL_TOKENS = {"llama3_json", "mistral"}  # their markers are special tokens


@dataclass
class ParsedDelta:
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def add(self, other: ParsedDelta) -> None:
        self.content += other.content
        self.tool_calls += other.tool_calls


def detect(chat_template: str | None) -> str:
    """The tool-call family a chat template writes (hermes when it says nothing)."""
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or ("ipython" in template and "parameters" in template):
        return "llama3_json"
    return "hermes"


def make_parser(name: str, forced_name: str | None = None) -> ToolCallParser:
    if name == "named":
        return NamedParser(forced_name or "")
    name = ALIASES.get(name, name)
    return {"hermes": HermesParser, "llama3_json": Llama3JsonParser, "mistral": MistralParser,
            "required": RequiredParser}[name]()


class ToolCallParser:
    """Content and tool calls out of streamed text. `num_calls`: calls found so far."""

    def __init__(self) -> None:
        self.num_calls = 0
        self._held = ""  # trailing whitespace of the content (dropped if calls follow)

    def feed(self, text: str) -> ParsedDelta:
        raise NotImplementedError

    def finish(self) -> ParsedDelta:
        raise NotImplementedError

    def _content(self, text: str) -> str:
        """Content with its trailing whitespace held back until more content follows."""
        text = self._held + text
        stripped = text.rstrip()
        self._held = text[len(stripped):]
        return stripped

    def _end(self, out: ParsedDelta) -> ParsedDelta:
        if not self.num_calls:
            out.content += self._held
        self._held = ""
        return out

    def _close(self, scanner: CallScanner, raw_prefix: str, out: ParsedDelta,
               raw_suffix: str = "") -> None:
        deltas = scanner.finish()
        if deltas is None:
            out.content += self._content(raw_prefix + scanner.raw + raw_suffix)
        else:
            out.tool_calls += deltas
            self.num_calls += 1


class HermesParser(ToolCallParser):
    START, END = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        super().__init__()
        self._buf = ""
        self._call: CallScanner | None = None

    def feed(self, text: str) -> ParsedDelta:
        self._buf += text
        out = ParsedDelta()
        while self._step(out):
            pass
        return out

    def _step(self, out: ParsedDelta) -> bool:
        marker = self.START if self._call is None else self.END
        at = self._buf.find(marker)
        end = at if at >= 0 else len(self._buf) - partial_suffix(self._buf, marker)
        text, self._buf = self._buf[:end], self._buf[end:]
        if self._call is None:
            out.content += self._content(text)
        else:
            out.tool_calls += self._call.feed(text)
        if at < 0:
            return False
        self._buf = self._buf[len(marker):]
        if self._call is None:
            self._call = CallScanner(self.num_calls)
        else:
            self._close(self._call, self.START, out, self.END)
            self._call = None
        return True

    def finish(self) -> ParsedDelta:
        out = ParsedDelta()
        if self._call is not None:  # no closing tag: the answer ended inside the call
            out.tool_calls += self._call.feed(self._buf)
            self._close(self._call, self.START, out)
            self._call = None
        else:
            out.content += self._content(self._buf)
        self._buf = ""
        return self._end(out)


class _CallSequence(ToolCallParser):
    """Calls as JSON objects at one depth of the text after a start (array elements, or
    top-level objects); what lies between them (brackets, commas, `;`) is dropped."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self._splitter = ObjectSplitter(depth)
        self._call: CallScanner | None = None

    def _calls(self, text: str, out: ParsedDelta) -> None:
        for piece in self._splitter.feed(text):
            if not piece.inside:
                continue
            if self._call is None:
                self._call = CallScanner(self.num_calls)
            out.tool_calls += self._call.feed(piece.text)
            if piece.ends_object:
                self._close(self._call, "", out)
                self._call = None

    def _finish_calls(self, out: ParsedDelta) -> None:
        if self._call is not None:
            self._close(self._call, "", out)
            self._call = None


class RequiredParser(_CallSequence):
    def __init__(self) -> None:
        super().__init__(depth=1)

    def feed(self, text: str) -> ParsedDelta:
        out = ParsedDelta()
        self._calls(text, out)
        return out

    def finish(self) -> ParsedDelta:
        out = ParsedDelta()
        self._finish_calls(out)
        return self._end(out)


class Llama3JsonParser(_CallSequence):
    """Tool calls only when the answer starts with them, as Llama 3's templates prompt."""

    TAG = "<|python_tag|>"

    def __init__(self) -> None:
        super().__init__(depth=0)
        self._mode: str | None = None  # None: undecided, "calls" or "content"
        self._buf = ""

    def feed(self, text: str) -> ParsedDelta:
        out = ParsedDelta()
        if self._mode is None:
            self._buf += text
            start = self._buf.lstrip()
            if not start or (self.TAG.startswith(start) and start != self.TAG):
                return out
            self._mode = "calls" if start.startswith(("{", self.TAG)) else "content"
            text = start.removeprefix(self.TAG) if self._mode == "calls" else self._buf
            self._buf = ""
        if self._mode == "content":
            out.content += self._content(text)
        else:
            self._calls(text, out)
        return out

    def finish(self) -> ParsedDelta:
        out = ParsedDelta()
        out.content += self._content(self._buf)
        self._finish_calls(out)
        return self._end(out)


class MistralParser(_CallSequence):
    """Content up to [TOOL_CALLS]; after it only calls: a JSON array, or name[ARGS]{...}."""

    MARK, ARGS = "[TOOL_CALLS]", "[ARGS]"

    def __init__(self) -> None:
        super().__init__(depth=1)
        self._buf = ""
        self._mode = "content"  # then "start" (after the marker), "array" or "named"
        self._named: CallScanner | None = None

    def feed(self, text: str) -> ParsedDelta:
        self._buf += text
        out = ParsedDelta()
        while self._step(out):
            pass
        return out

    def _step(self, out: ParsedDelta) -> bool:
        if self._mode == "content":
            at = self._buf.find(self.MARK)
            end = at if at >= 0 else len(self._buf) - partial_suffix(self._buf, self.MARK)
            out.content += self._content(self._buf[:end])
            self._buf = self._buf[end + len(self.MARK):] if at >= 0 else self._buf[end:]
            self._mode = "start" if at >= 0 else "content"
            return at >= 0
        if self._mode == "start":
            start = self._buf.lstrip()
            if not start:
                return False
            self._mode, self._buf = ("array", start) if start[0] == "[" else ("name", start)
            return True
        if self._mode == "array":
            self._calls(self._buf, out)
            self._buf = ""
            return False
        return self._step_named(out)

    def _step_named(self, out: ParsedDelta) -> bool:
        if self._named is None:
            self._buf = self._buf.replace(self.MARK, "")
            at = self._buf.find(self.ARGS)
            if at < 0:
                return False
            self._named = CallScanner(self.num_calls, name=self._buf[:at].strip())
            self._splitter = ObjectSplitter(0)
            self._buf = self._buf[at + len(self.ARGS):]
        taken, done = 0, False
        for piece in self._splitter.feed(self._buf):
            taken += len(piece.text)
            if piece.ends_object:
                done = True
                break
        out.tool_calls += self._named.feed(self._buf[:taken])
        self._buf = self._buf[taken:]
        if done:
            self._close(self._named, "", out)
            self._named = None
        return done

    def finish(self) -> ParsedDelta:
        out = ParsedDelta()
        if self._mode == "content":
            out.content += self._content(self._buf)
        self._finish_calls(out)
        if self._named is not None:
            self._close(self._named, "", out)
        return self._end(out)


class NamedParser(ToolCallParser):
    """tool_choice naming one function: the whole answer is its arguments."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._call = CallScanner(0, name=name)

    def feed(self, text: str) -> ParsedDelta:
        return ParsedDelta(tool_calls=self._call.feed(text))

    def finish(self) -> ParsedDelta:
        out = ParsedDelta()
        self._close(self._call, "", out)
        return self._end(out)


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker`."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
