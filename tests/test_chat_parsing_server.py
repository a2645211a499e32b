"""Reasoning and tool-call parsing through the HTTP server and the official `openai` client, on the
fake engine replaying recorded answers ("__say:...__"): reasoning_content and tool_calls, streamed
and whole, with no markup in content. The real model's side is in test_api_structured.py."""

from __future__ import annotations

import json

import openai
import pytest
from fake_engine import FakeEngine
from server_harness import running_server

from hearth.appliance.settings import Settings

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
THOUGHT = "<think>\nThe user wants the weather.\n</think>\n\n"
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def client():
    settings = Settings(no_ui=True, reasoning_parser="think", tool_call_parser="hermes")
    with running_server(settings, lambda: FakeEngine(max_model_len=4096)) as server:
        yield openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)


def _say(text: str) -> list[dict]:
    return [{"role": "user", "content": f"__say:{text}__"}]


def test_reasoning_content_whole_and_streamed(client):
    messages = _say(THOUGHT + "It is sunny in Paris.")
    out = client.chat.completions.create(model="fake-model", messages=messages, temperature=0)
    message = out.choices[0].message
    assert message.content == "It is sunny in Paris."
    assert message.model_extra["reasoning_content"] == "\nThe user wants the weather.\n"
    chunks = list(client.chat.completions.create(model="fake-model", messages=messages,
                                                 temperature=0, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert reasoning == "\nThe user wants the weather.\n" and content == "It is sunny in Paris."


@pytest.mark.parametrize("stream", [False, True])
def test_auto_tool_calls_are_parsed_without_markup_in_content(client, stream):
    messages = _say(THOUGHT + CALL)
    kwargs = dict(model="fake-model", messages=messages, temperature=0, tools=TOOLS)
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        return
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == ""
    calls = [t for d in deltas for t in (d.tool_calls or [])]
    assert calls[0].id and calls[0].function.name == "get_weather"
    assert json.loads("".join(t.function.arguments or "" for t in calls)) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_leaves_markup_as_content(client):
    out = client.chat.completions.create(model="fake-model", messages=_say(CALL), temperature=0,
                                         tools=TOOLS, tool_choice="none")
    assert out.choices[0].message.content == CALL and not out.choices[0].message.tool_calls


def test_history_with_tool_calls_renders_for_a_template_without_tools(client):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear"}'},
        {"role": "user", "content": "__say:Clear skies.__"},
    ]
    out = client.chat.completions.create(model="fake-model", messages=messages, temperature=0,
                                         tools=TOOLS)
    assert out.choices[0].message.content == "Clear skies."
    assert out.choices[0].finish_reason == "stop"
