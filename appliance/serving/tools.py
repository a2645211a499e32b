"""A chat request's tools → what the prompt, the grammar and the answer's parser do with them.

    tool_choice "none"      tools left out of the prompt; the answer is plain content
    tool_choice "auto"      tools in the prompt; the model's own tool-call format is parsed out of
                            the answer (tool_parsers.py, the family from the template or
                            --tool-call-parser)
    tool_choice "required"  a grammar forces a JSON array of calls, each {"name", "parameters"}
                            valid against that function's schema (one call unless
                            parallel_tool_calls)
    a named function        a grammar forces that function's arguments object

The tools reach the model through its own chat template (which receives `tools`, assistant
`tool_calls` and `tool` messages). A template that knows no tools (the default model's ChatML)
gets Hearth's Hermes-style system prompt instead, with calls and results written as
<tool_call> / <tool_response> text: the hermes parser then reads the answer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from hearth.appliance.protocol import ChatCompletionRequest, bad_request
from hearth.appliance.serving.structured import closed, spec
from hearth.engine.structured_output import StructuredOutput

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
_SYSTEM = (
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


@dataclass(frozen=True)
class ToolPlan:
    mode: str  # "none", "auto", "required" or "named"
    parser: str | None  # the answer's parser (a family, "required", "named"); None: content only
    name: str | None = None  # the named function
    tools: list[dict[str, Any]] | None = None  # what the chat template receives
    constraint: StructuredOutput | None = None  # the grammar of a forced call
    parallel: bool = True


def plan_tools(request: ChatCompletionRequest, family: str) -> ToolPlan:
    """Check the tools and tool_choice (400s naming them) and decide how to serve them."""
    tools = request.tools or []
    choice = request.tool_choice if request.tool_choice is not None else (
        "auto" if tools else "none")
    parallel = request.parallel_tool_calls is not False
    names = _check_tools(tools)
    if choice == "none" or (choice == "auto" and not tools):
        return ToolPlan("none", None, parallel=parallel)
    if not tools:
        raise bad_request("tool_choice needs tools", param="tool_choice")
    listed = [t.model_dump(exclude_none=True, by_alias=True) for t in tools]
    if choice == "auto":
        return ToolPlan("auto", family, tools=listed, parallel=parallel)
    if choice == "required":
        schema = _calls_schema(list(names.values()), parallel)
        return ToolPlan("required", "required", tools=listed,
                        constraint=spec("tools", json=schema), parallel=parallel)
    name = choice.function.name
    if name not in names:
        raise bad_request(f"tool_choice names {name!r}, which is not among the tools "
                          f"({', '.join(sorted(names))})", param="tool_choice")
    schema = names[name].parameters or _NO_PARAMETERS
    return ToolPlan("named", "named", name=name, tools=listed,
                    constraint=spec("tools", json=schema), parallel=parallel)


def _check_tools(tools: list[Any]) -> dict[str, Any]:
    functions: dict[str, Any] = {}
    for i, tool in enumerate(tools):
        fn = tool.function
        if not _NAME.match(fn.name):
            raise bad_request(f"tools[{i}].function.name {fn.name!r} must be 1-64 letters, "
                              "digits, '_', '.' or '-'", param="tools")
        if fn.name in functions:
            raise bad_request(f"tools[{i}]: the function name {fn.name!r} is used twice",
                              param="tools")
        if fn.parameters is not None:
            spec("tools", json=fn.parameters)  # size and depth limits, before any template sees it
            if fn.strict:
                fn = fn.model_copy(update={"parameters": closed(fn.parameters)})
        functions[fn.name] = fn
    return functions


def _calls_schema(functions: list[Any], parallel: bool) -> dict[str, Any]:
    """A JSON array of calls, each valid against its function's schema ("name" first)."""
    calls = [{"type": "object",
              "properties": {"name": {"const": fn.name},
                             "parameters": fn.parameters or _NO_PARAMETERS},
              "required": ["name", "parameters"], "additionalProperties": False}
             for fn in functions]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def inline_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
                 ) -> list[dict[str, Any]]:
    """Messages for a template that knows no tools: the tools in a system prompt, calls and
    results written out as <tool_call> / <tool_response> text (the Hermes format)."""
    out = []
    for message in messages:
        if message.get("tool_calls"):
            calls = "\n".join(
                "<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                              "arguments": c["function"]["arguments"]},
                                             ensure_ascii=False) + "\n</tool_call>"
                for c in message["tool_calls"])
            text = (message.get("content") or "").strip()
            out.append({"role": "assistant", "content": f"{text}\n{calls}".strip()})
        elif message["role"] == "tool":
            out.append({"role": "user",
                        "content": f"<tool_response>\n{message['content']}\n</tool_response>"})
        else:
            out.append({"role": message["role"], "content": message.get("content") or ""})
    if tools:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        system = _SYSTEM.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + system}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out
