"""Capability advertisement (appliance/serving/capabilities.py): what /api/show, /v1/models,
`hearth models` and the monitor list, and that it matches what the chat endpoint really accepts.

When tool calling or structured output starts to work (issue 15), the two consistency tests fail
until SERVER_FEATURES says so: an advertisement can neither lag nor lead the server."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
from helpers import add_fim_tokens, save_tiny_tokenizer

from hearth.appliance.protocol import APIError, ChatCompletionRequest, parse_request
from hearth.appliance.serving.capabilities import SERVER_FEATURES, ServerFeatures, capabilities
from hearth.appliance.serving.chat import ChatServing
from hearth.appliance.serving.core import Serving
from hearth.engine.fim import detect_fim
from hearth.engine.prepare import ModelInfo
from hearth.engine.tokenizer import Tokenizer

# A template that renders tools and has a thinking switch, as Qwen3's does.
TEMPLATE = (
    "{% if tools %}<tools>{{ tools | tojson }}</tools>\n{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% if enable_thinking is defined and "
    "not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> ModelInfo:
    path = save_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    add_fim_tokens(path, "qwen")
    tokenizer = Tokenizer.from_hf_dir(path).with_chat_template(TEMPLATE)
    return ModelInfo("tiny", 512, 512, tokenizer, fim=detect_fim(tokenizer, 512))


def test_completion_always_insert_with_fim_tokens(model):
    assert capabilities(model)[:1] == ["completion"]
    assert "insert" in capabilities(model)
    assert capabilities(replace(model, fim=None), SERVER_FEATURES) == ["completion"] + (
        ["tools"] if SERVER_FEATURES.tools else [])


def test_tools_and_thinking_only_when_the_server_does_them(model):
    none = ServerFeatures(tools=False, thinking=False, structured_output=False)
    assert capabilities(model, none) == ["completion", "insert"]
    both = ServerFeatures(tools=True, thinking=True, structured_output=True)
    assert capabilities(model, both) == ["completion", "tools", "insert", "thinking"]
    plain = replace(model, tokenizer=model.tokenizer.with_chat_template("{{ messages }}"))
    assert "thinking" not in capabilities(plain, both)  # no thinking switch in the template


def _chat_accepts(model: ModelInfo, **fields) -> bool:
    serving = Serving(SimpleNamespace(model=model), ())
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}
    try:
        request = parse_request(ChatCompletionRequest, json.dumps(body).encode())
        ChatServing(serving).prepare(request)
    except APIError:
        return False
    return True


def test_advertised_tools_match_what_the_chat_endpoint_accepts(model):
    assert _chat_accepts(model)
    assert SERVER_FEATURES.tools == _chat_accepts(model, tools=[WEATHER])


def test_advertised_structured_output_matches_what_the_chat_endpoint_accepts(model):
    schema = {"name": "x", "schema": {"type": "object"}}
    accepts = _chat_accepts(model, response_format={"type": "json_schema", "json_schema": schema})
    assert SERVER_FEATURES.structured_output == accepts
