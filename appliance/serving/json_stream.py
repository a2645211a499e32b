"""Tool calls out of JSON that arrives in pieces: the building blocks of the tool-call parsers.

    ObjectSplitter   a stream of text → the JSON objects at one nesting depth (what lies between
                     them is "outside": array brackets, commas, `;`, prose)
    CallScanner      one streamed object {"name": ..., "arguments" | "parameters": {...}} → OpenAI
                     tool-call deltas: the header (id, type, name) as soon as the name is complete,
                     then the arguments' JSON text as it arrives

A call whose object is not in that shape (keys in another order, arguments as a JSON string) is
parsed whole when it ends; one that is not a call at all comes back as raw text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

_HEAD = re.compile(
    r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_ARG_KEYS = ("arguments", "parameters")


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class Piece:
    """A piece of the splitter's input: inside an object (`inside`), or between objects."""

    text: str
    inside: bool
    ends_object: bool = False  # this piece closes its object


class ObjectSplitter:
    """Splits streamed text into the JSON objects that open at `depth` (0: top level; 1: inside
    one array) and the text around them. Strings and escapes are tracked, so braces in strings
    do not count."""

    def __init__(self, depth: int = 0) -> None:
        self._open_depth = depth
        self._depth = 0
        self._in_string = False
        self._escape = False

    def feed(self, text: str) -> list[Piece]:
        pieces: list[Piece] = []
        start = 0
        for i, ch in enumerate(text):
            inside_before = self._depth > self._open_depth
            self._step(ch)
            inside_after = self._depth > self._open_depth
            if not inside_before and inside_after:  # an object opens at i
                _add(pieces, text[start:i], False)
                start = i
            elif inside_before and not inside_after:  # it closed with i
                pieces.append(Piece(text[start:i + 1], True, ends_object=True))
                start = i + 1
        _add(pieces, text[start:], self._depth > self._open_depth)
        return pieces

    def _step(self, ch: str) -> None:
        if self._in_string:
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                self._in_string = False
        elif ch == '"':
            self._in_string = self._depth > 0
        elif ch in "{[":
            self._depth += 1
        elif ch in "}]":
            self._depth = max(0, self._depth - 1)


def _add(pieces: list[Piece], text: str, inside: bool) -> None:
    if text:
        pieces.append(Piece(text, inside))


class CallScanner:
    """One tool call's JSON object, fed in pieces → tool-call deltas (OpenAI's streaming form).

    With `name` given (a named tool_choice), the text fed is the arguments object itself."""

    def __init__(self, index: int, name: str | None = None) -> None:
        self.index = index
        self.name = name
        self.raw = ""
        self._args_start: int | None = 0 if name is not None else None
        self._args = ObjectSplitter()
        self._args_sent = 0
        self._args_done = False
        self._whole = False  # not in the streamable shape: parsed when it ends
        self.started = False

    def feed(self, text: str) -> list[dict[str, Any]]:
        self.raw += text
        if self._args_start is None and not self._whole:
            self._find_head()
        if self._args_start is None:
            return []
        deltas = []
        if not self.started:
            self.started = True
            deltas.append(self._header())
        return deltas + self._more_args()

    def finish(self) -> list[dict[str, Any]] | None:
        """The last deltas; None when the text was no tool call (the caller shows it as text)."""
        if self.started:
            return self._more_args()
        call = _parse_call(self.raw)
        if call is None:
            return None
        self.name, arguments = call
        self.started = True
        return [self._header(), self._delta(arguments)]

    def _find_head(self) -> None:
        head = _HEAD.match(self.raw)
        if head is None:
            if not _could_be_head(self.raw):
                self._whole = True
            return
        first = self.raw[head.end():head.end() + 1]
        if first in ("{", "["):
            self.name = json.loads(f'"{head.group(1)}"')
            self._args_start = head.end()
        elif first:
            self._whole = True  # arguments as a JSON string, or a scalar

    def _more_args(self) -> list[dict[str, Any]]:
        if self._args_done or self._args_start is None:
            return []
        new = self.raw[self._args_start + self._args_sent:]
        taken = 0
        for piece in self._args.feed(new):
            taken += len(piece.text)
            if piece.ends_object:
                self._args_done = True
                break
        new = new[:taken]
        self._args_sent += len(new)
        return [self._delta(new)] if new else []

    def _header(self) -> dict[str, Any]:
        return {"index": self.index, "id": new_call_id(), "type": "function",
                "function": {"name": self.name, "arguments": ""}}

    def _delta(self, arguments: str) -> dict[str, Any]:
        return {"index": self.index, "function": {"arguments": arguments}}


def _could_be_head(text: str) -> bool:
    """Whether `text` may still grow into `{"name": "...", "arguments": `: once it cannot, the
    object has another shape and is parsed whole when it ends."""
    compact = re.sub(r"\s+", "", text)  # names hold no whitespace
    opening = '{"name":"'
    if len(compact) <= len(opening):
        return opening.startswith(compact)
    if not compact.startswith(opening):
        return False
    rest = compact[len(opening):]
    after = rest[re.match(r'(?:[^"\\]|\\.)*', rest).end():]
    if not after:
        return True  # still in the name
    after = after[1:]  # its closing quote
    return any(f',"{key}":'.startswith(after) or after.startswith(f',"{key}":')
               for key in _ARG_KEYS)


def _parse_call(text: str) -> tuple[str, str] | None:
    """(name, arguments JSON) of a whole call object, or None."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = next((value[k] for k in _ARG_KEYS if k in value), {})
    if isinstance(arguments, str):
        return value["name"], arguments
    return value["name"], json.dumps(arguments, ensure_ascii=False)


def merge_call_deltas(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Streamed tool-call deltas → the whole calls of a non-streamed message, in index order."""
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        call = calls.get(delta["index"])
        if call is None:
            calls[delta["index"]] = {"id": delta["id"], "type": "function",
                                     "function": dict(delta["function"])}
        else:
            call["function"]["arguments"] += delta["function"]["arguments"]
    return [calls[i] for i in sorted(calls)]
