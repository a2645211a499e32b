"""Request schemas for tool calling and structured output (pydantic), and the base every request
schema shares.

    tools / tool_choice / parallel_tool_calls       OpenAI function tools
    messages[i].tool_calls, role "tool" messages      a tool round trip in the history
    response_format                                   text | json_object | json_schema
    structured_outputs                                vLLM's extension: json, regex, choice, grammar
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    """Types are checked strictly (a wrong JSON type is a 400 naming the field, never a silent
    coercion). Unknown fields are kept in `model_extra`: accepted, and logged once by name."""

    model_config = ConfigDict(strict=True, extra="allow", populate_by_name=True)


class FunctionDefinition(Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no arguments
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"] = "function"
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(Strict):
    """A call in an assistant message of the history."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class JsonSchemaFormat(Strict):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(Strict):
    """vLLM's `structured_outputs` body field (and its older `guided_*` fields, mapped here)."""

    json_: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class StructuredOutputFields(Strict):
    """The structured-output fields both endpoints take: OpenAI's response_format, vLLM's
    structured_outputs, and vLLM's pre-0.10 `guided_*` names that many clients still send."""

    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None
    response_format: ResponseFormat | None = None
