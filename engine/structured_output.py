"""StructuredOutput: what a request's output must match, and the limits a spec must stay within.

One of: a JSON schema, any JSON object, a regular expression, one of a list of strings, or a
grammar (llguidance's Lark dialect, or GBNF as llama.cpp and vLLM's EBNF write it). The fields
follow vLLM's `structured_outputs` (json, json_object, regex, choice, grammar). Plain data, no
torch and no grammar library: SamplingParams carries it, engine/grammar.py compiles it.

The limits keep a crafted request from costing the server more than a few milliseconds to
compile: the spec's size in characters, how deeply the schema document nests, how many choices.
llguidance bounds the rest (grammar size, lexer states, work per token) by its own parser limits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

MAX_SPEC_CHARS = 64_000  # a schema or grammar as JSON text; OpenAI's own limit is in this range
MAX_SCHEMA_DEPTH = 24  # nesting of the schema document (objects and lists inside each other)
MAX_CHOICES = 1_000


@dataclass(frozen=True)
class StructuredOutput:
    """Exactly one of the constraints is set. `source` names the request field it came from
    ("response_format", "tools", ...), so that an error can name it."""

    json: dict[str, Any] | None = None  # a JSON schema
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None  # Lark (llguidance) or GBNF (`root ::= ...`)
    source: str = field(default="structured_outputs", compare=False)

    def __post_init__(self) -> None:
        if self.choice is not None and not isinstance(self.choice, tuple):
            object.__setattr__(self, "choice", tuple(self.choice))
        check(self)

    @property
    def kind(self) -> str:
        for name in ("json", "regex", "choice", "grammar"):
            if getattr(self, name) is not None:
                return name
        return "json_object"

    @cached_property
    def key(self) -> str:
        """The compile cache's key: the same constraint gives the same key, whatever its source."""
        value = {"json": self.json, "regex": self.regex, "choice": self.choice,
                 "grammar": self.grammar, "json_object": self.json_object}[self.kind]
        return self.kind + ":" + json.dumps(value, sort_keys=True, separators=(",", ":"))


class StructuredOutputError(ValueError):
    """A constraint that cannot be used; `field` is the request field to name in a 400."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def check(spec: StructuredOutput) -> None:
    """Raise StructuredOutputError unless exactly one constraint is set, of the right type, within
    the limits."""
    where = spec.source
    num_set = sum(x is not None for x in (spec.json, spec.regex, spec.choice, spec.grammar))
    num_set += bool(spec.json_object)
    if num_set != 1:
        raise StructuredOutputError(
            f"{where}: set exactly one of json, json_object, regex, choice or grammar "
            f"(got {num_set})", where)
    if spec.json is not None:
        _check_schema(spec.json, where)
    elif spec.choice is not None:
        _check_choice(spec.choice, where)
    else:
        text = spec.regex if spec.regex is not None else spec.grammar
        if text is not None:
            _check_text(text, where)


def _check_schema(schema: Any, where: str) -> None:
    if not isinstance(schema, dict):
        raise StructuredOutputError(f"{where}: the JSON schema must be an object, "
                                    f"got {type(schema).__name__}", where)
    depth = _depth(schema)
    if depth > MAX_SCHEMA_DEPTH:
        raise StructuredOutputError(
            f"{where}: the JSON schema nests {depth} levels deep; the limit is "
            f"{MAX_SCHEMA_DEPTH} (use $defs and $ref for recursive structures)", where)
    size = len(json.dumps(schema, separators=(",", ":")))
    if size > MAX_SPEC_CHARS:
        raise StructuredOutputError(
            f"{where}: the JSON schema is {size} characters; the limit is {MAX_SPEC_CHARS}",
            where)


def _check_choice(choice: tuple[str, ...], where: str) -> None:
    if not choice or not all(isinstance(c, str) for c in choice):
        raise StructuredOutputError(f"{where}: choice must be a non-empty list of strings", where)
    if len(choice) > MAX_CHOICES:
        raise StructuredOutputError(
            f"{where}: {len(choice)} choices; the limit is {MAX_CHOICES}", where)
    _check_text("".join(choice), where)


def _check_text(text: Any, where: str) -> None:
    if not isinstance(text, str) or not text:
        raise StructuredOutputError(f"{where}: must be a non-empty string", where)
    if len(text) > MAX_SPEC_CHARS:
        raise StructuredOutputError(
            f"{where}: {len(text)} characters; the limit is {MAX_SPEC_CHARS}", where)


def _depth(value: Any) -> int:
    """Nesting depth of a JSON document, iteratively (a crafted one must not blow the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_SCHEMA_DEPTH:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest
