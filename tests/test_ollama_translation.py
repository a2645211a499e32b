"""Ollama → OpenAI request translation (appliance/serving/ollama.py), without a server: options,
messages and tool calls, format / tools / think onto the fields issue 15's work reads, errors
renamed to the Ollama field the client sent."""

from __future__ import annotations

import json

import pytest
from fake_engine import FakeTokenizer

from hearth.appliance.ollama_protocol import (
    OllamaChatRequest,
    OllamaError,
    OllamaGenerateRequest,
    parse_ollama,
)
from hearth.appliance.protocol import APIError, ChatCompletionRequest, CompletionRequest
from hearth.appliance.serving.ollama import chat_body, generate_body, ollama_error, sampling
from hearth.engine.prepare import ModelInfo

MODEL = ModelInfo("m", max_model_len=4096, vocab_size=FakeTokenizer.vocab_size,
                  tokenizer=FakeTokenizer())
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def chat(**fields) -> OllamaChatRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_ollama(OllamaChatRequest, json.dumps(body).encode())


def generate(**fields) -> OllamaGenerateRequest:
    return parse_ollama(OllamaGenerateRequest, json.dumps({"model": "m", **fields}).encode())


def test_options_map_to_sampling_with_ollama_defaults():
    assert sampling(None, MODEL) == {"temperature": 0.8, "top_k": 40, "top_p": 0.9}
    options = chat(options={"num_predict": 64.0, "temperature": 0, "top_p": 0.5, "top_k": 7,
                            "seed": 3, "stop": ["\n\n"], "repeat_penalty": 1.1, "min_p": 0.05,
                            "num_ctx": 4096, "num_thread": 2, "mirostat": 0}).options
    assert sampling(options, MODEL) == {
        "temperature": 0, "top_k": 7, "top_p": 0.5, "min_p": 0.05, "seed": 3,
        "repetition_penalty": 1.1, "stop": ["\n\n"], "max_tokens": 64,
    }
    assert "max_tokens" not in sampling(chat(options={"num_predict": -1}).options, MODEL)
    assert sampling(chat(options={"stop": "END"}).options, MODEL)["stop"] == ["END"]


@pytest.mark.parametrize(("options", "words"), [
    ({"num_ctx": 8192}, "options.num_ctx is 8192, but the model's context length here is 4096"),
    ({"num_predict": 0}, "options.num_predict must be a positive number"),
])
def test_bad_options_are_400s_naming_them(options, words):
    with pytest.raises(OllamaError, match=words) as error:
        sampling(chat(options=options).options, MODEL)
    assert error.value.status == 400


def test_wrong_types_name_the_field_and_unknown_fields_are_ignored():
    with pytest.raises(OllamaError, match="options.temperature") as error:
        chat(options={"temperature": "hot"})
    assert error.value.status == 400
    with pytest.raises(OllamaError, match="messages.0.content"):
        chat(messages=[{"role": "user", "content": 5}])
    assert chat(some_future_field=1, options={"future_option": 2}).model == "m"


def test_chat_body_parses_as_the_openai_request():
    body = chat_body(chat(options={"temperature": 0, "num_predict": 5}), MODEL, "m")
    request = ChatCompletionRequest.model_validate_json(json.dumps(body))
    assert request.messages[0].content == "hi" and request.max_tokens == 5
    assert request.temperature == 0 and not request.model_extra


def test_tools_format_and_think_map_onto_the_chat_request_fields():
    body = chat_body(chat(tools=[WEATHER], format="json", think=True), MODEL, "m")
    assert body["tools"] == [WEATHER]
    assert body["response_format"] == {"type": "json_object"}
    assert body["chat_template_kwargs"] == {"enable_thinking": True}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    body = chat_body(chat(format=schema, think="high"), MODEL, "m")
    assert body["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "format", "schema": schema, "strict": True}
    }
    assert body["reasoning_effort"] == "high"
    assert "chat_template_kwargs" not in chat_body(chat(think=False), MODEL, "m")


def test_tool_calls_get_ids_and_tool_replies_answer_them():
    messages = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"function": {"name": "get_time", "arguments": {}}},
        ]},
        {"role": "tool", "content": "12:00", "tool_name": "get_time"},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
    ]
    converted = chat_body(chat(messages=messages), MODEL, "m")["messages"]
    calls = converted[1]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert converted[2]["tool_call_id"] == calls[1]["id"] and converted[2]["name"] == "get_time"
    assert converted[3]["tool_call_id"] == calls[0]["id"]


def test_images_are_a_clear_400():
    with pytest.raises(OllamaError, match=r"messages\[0\].images: images are not supported"):
        chat_body(chat(messages=[{"role": "user", "content": "x", "images": ["aGk="]}]), MODEL, "m")
    with pytest.raises(OllamaError, match="images"):
        generate_body(generate(prompt="x", images=["aGk="]), MODEL, "m")


def test_generate_goes_through_the_chat_template_unless_raw_or_fill_in_the_middle():
    schema, body = generate_body(generate(prompt="Hi", system="Be brief"), MODEL, "m")
    assert schema is ChatCompletionRequest
    assert body["messages"] == [{"role": "system", "content": "Be brief"},
                                {"role": "user", "content": "Hi"}]
    schema, body = generate_body(generate(prompt="def f(", raw=True), MODEL, "m")
    assert schema is CompletionRequest and body["prompt"] == "def f(" and "suffix" not in body
    assert body["max_tokens"] is None  # Ollama's num_predict -1, not /v1/completions' 16
    schema, body = generate_body(generate(prompt="def f(", suffix=")\n"), MODEL, "m")
    assert schema is CompletionRequest and body["suffix"] == ")\n"
    CompletionRequest.model_validate_json(json.dumps(body))


@pytest.mark.parametrize("field", ["template", "context"])
def test_generate_fields_without_an_equivalent_are_400s(field):
    value = [1, 2] if field == "context" else "{{ .Prompt }}"
    with pytest.raises(OllamaError, match=f"{field} .* is not supported"):
        generate_body(generate(prompt="x", **{field: value}), MODEL, "m")


def test_openai_errors_come_back_naming_the_ollama_field():
    unknown = APIError(400, "Unrecognized request argument supplied: chat_template_kwargs",
                       param="chat_template_kwargs")
    assert ollama_error(unknown).message == "think is not supported by this server"
    refused = APIError(400, "response_format 'json_object' is not supported by this server",
                       param="response_format")
    assert ollama_error(refused).message.startswith("format: response_format")
    full = APIError(429, "queue full", headers={"Retry-After": "1"})
    assert ollama_error(full).status == 429 and ollama_error(full).headers == {"Retry-After": "1"}
