"""A request's structured-output fields → the engine's StructuredOutput, and its logit_bias.

    response_format {"type": "json_object"}                    → any JSON object
    response_format {"type": "json_schema", "json_schema": …}   → that schema
    structured_outputs {json | regex | choice | grammar | json_object}    (vLLM)
    guided_json / guided_regex / guided_choice / guided_grammar           (vLLM before 0.10)

At most one of them may constrain a request (and not together with a forced tool call).
"""

from __future__ import annotations

import json
from typing import Any

from hearth.appliance.protocol import bad_request
from hearth.appliance.protocol_tools import StructuredOutputFields
from hearth.engine.structured_output import StructuredOutput, StructuredOutputError


def structured_output(request: StructuredOutputFields) -> StructuredOutput | None:
    """The request's constraint, or None; APIError(400) naming the field when it is unusable."""
    found = [spec for spec in (_response_format(request), _structured_outputs(request),
                               _guided(request)) if spec is not None]
    if len(found) > 1:
        names = " and ".join(spec.source for spec in found)
        raise bad_request(f"{names} both constrain the output; send one", param=found[1].source)
    return found[0] if found else None


def spec(source: str, **constraint: Any) -> StructuredOutput:
    """A StructuredOutput, its problems as a 400 naming `source`."""
    try:
        return StructuredOutput(source=source, **constraint)
    except StructuredOutputError as error:
        raise bad_request(str(error), param=error.field) from None


def logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI sends token ids as JSON object keys (strings)."""
    if not bias:
        return None
    ids = {}
    for key, value in bias.items():
        try:
            ids[int(key)] = value
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}",
                              param="logit_bias") from None
    return ids


def _response_format(request: StructuredOutputFields) -> StructuredOutput | None:
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return spec("response_format", json_object=True)
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise bad_request('response_format of type "json_schema" needs json_schema.schema '
                          '(a JSON schema)', param="response_format")
    checked = spec("response_format", json=fmt.json_schema.schema_)  # limits first
    if not fmt.json_schema.strict:
        return checked
    return spec("response_format", json=closed(checked.json))


def closed(schema: Any) -> Any:
    """OpenAI's strict mode: objects that do not say otherwise take no other properties."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: closed(value) for key, value in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _structured_outputs(request: StructuredOutputFields) -> StructuredOutput | None:
    so = request.structured_outputs
    if so is None:
        return None
    values = {"json": _json_value(so.json_, "structured_outputs.json"), "regex": so.regex,
              "choice": so.choice, "grammar": so.grammar, "json_object": bool(so.json_object)}
    values = {k: v for k, v in values.items() if v not in (None, False)}
    return spec("structured_outputs", **values) if values else None


def _guided(request: StructuredOutputFields) -> StructuredOutput | None:
    fields = {"guided_json": ("json", _json_value(request.guided_json, "guided_json")),
              "guided_regex": ("regex", request.guided_regex),
              "guided_choice": ("choice", request.guided_choice),
              "guided_grammar": ("grammar", request.guided_grammar)}
    given = [(name, kind, value) for name, (kind, value) in fields.items() if value is not None]
    if not given:
        return None
    if len(given) > 1:
        raise bad_request(f"{given[0][0]} and {given[1][0]} both constrain the output; send one",
                          param=given[1][0])
    name, kind, value = given[0]
    return spec(name, **{kind: value})


def _json_value(value: str | dict[str, Any] | None, where: str) -> dict[str, Any] | None:
    """A schema given as an object, or as JSON text."""
    if not isinstance(value, str):
        return value
    param = where.split(".")[0]
    try:
        schema = json.loads(value)
    except json.JSONDecodeError as error:
        raise bad_request(f"{where} is not valid JSON: {error}", param=param) from None
    if not isinstance(schema, dict):
        raise bad_request(f"{where} must be a JSON schema object", param=param)
    return schema
