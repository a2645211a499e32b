"""Structured output and tool calling with the real default model on CPU, through the official
`openai` client over real HTTP (and LangChain's OpenAI client as a second one): JSON schemas that
validate, forced tool calls whose arguments validate, a full tool round trip, unknown fields,
bad schemas, logit_bias, and unconstrained requests unchanged beside constrained ones."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest
from server_harness import running_server

from hearth.appliance.settings import Settings
from hearth.cli import engine_factory

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 10},
                   "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "likes_cats": {"type": "boolean"}},
    "required": ["name", "age", "likes_cats"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20},
                   "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string", "maxLength": 20}},
                                          "required": ["city"], "additionalProperties": False}}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TOOLS[1]["function"]["parameters"]}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server():
    settings = Settings(device="cpu", no_ui=True)
    with running_server(settings, engine_factory(settings)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def _stream_text(chunks) -> tuple[str, str | None]:
    text, reason = "", None
    for chunk in chunks:
        for choice in chunk.choices:
            text += (choice.delta.content if hasattr(choice, "delta") else choice.text) or ""
            reason = choice.finish_reason or reason
    return text, reason


@pytest.mark.parametrize("stream", [False, True])
def test_chat_json_schema_validates(client, model, stream):
    kwargs = dict(model=model, messages=[{"role": "user", "content": "Describe a person."}],
                  max_tokens=48, temperature=0,
                  response_format={"type": "json_schema",
                                   "json_schema": {"name": "person", "schema": PERSON,
                                                   "strict": True}})
    if stream:
        text, reason = _stream_text(client.chat.completions.create(**kwargs, stream=True))
    else:
        choice = client.chat.completions.create(**kwargs).choices[0]
        text, reason = choice.message.content, choice.finish_reason
    assert reason == "stop", text  # every string the schema allows fits in max_tokens
    jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize("stream", [False, True])
def test_completion_structured_outputs_json_and_choice(client, model, stream):
    extra = {"structured_outputs": {"json": PERSON}}
    kwargs = dict(model=model, prompt="A person as JSON:", max_tokens=48, temperature=0.8,
                  seed=1, extra_body=extra)
    if stream:
        text, reason = _stream_text(client.completions.create(**kwargs, stream=True))
    else:
        choice = client.completions.create(**kwargs).choices[0]
        text, reason = choice.text, choice.finish_reason
    assert reason == "stop", text
    jsonschema.validate(json.loads(text), PERSON)
    choice = client.completions.create(model=model, prompt="Is the sky blue?", max_tokens=4,
                                       extra_body={"guided_choice": ["yes", "no"]}).choices[0]
    assert choice.text in ("yes", "no") and choice.finish_reason == "stop"


def test_json_object_and_regex(client, model):
    out = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Give me a JSON object."}],
        max_tokens=40, temperature=0, response_format={"type": "json_object"})
    choice = out.choices[0]
    if choice.finish_reason == "stop":  # "length" is the one excuse for unparsable output
        assert isinstance(json.loads(choice.message.content), dict)
    regex = client.completions.create(model=model, prompt="A date:", max_tokens=16,
                                      extra_body={"structured_outputs": {
                                          "regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"}})
    text = regex.choices[0].text
    assert len(text) == 10 and text[:2] == "20" and text[4] == "-" == text[7]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tool_choice", ["required", "named"])
def test_forced_tool_calls_validate(client, model, stream, tool_choice):
    choice = ({"type": "function", "function": {"name": "get_weather"}}
              if tool_choice == "named" else "required")
    kwargs = dict(model=model, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=60,
                  temperature=0.7, seed=3, parallel_tool_calls=False)
    if stream:
        calls: dict[int, dict] = {}
        reason = None
        for chunk in client.chat.completions.create(**kwargs, stream=True):
            delta = chunk.choices[0].delta
            assert not delta.content  # no markup, no JSON in content
            for call in delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"name": None, "arguments": ""})
                entry["name"] = entry["name"] or (call.function.name if call.function else None)
                entry["arguments"] += (call.function.arguments or "") if call.function else ""
            reason = chunk.choices[0].finish_reason or reason
        found = [(c["name"], c["arguments"]) for _, c in sorted(calls.items())]
    else:
        out = client.chat.completions.create(**kwargs).choices[0]
        reason = out.finish_reason
        assert out.message.content is None
        found = [(c.function.name, c.function.arguments) for c in out.message.tool_calls]
        assert all(c.id.startswith("call_") for c in out.message.tool_calls)
    assert reason == "tool_calls" and len(found) == 1
    name, arguments = found[0]
    assert name in SCHEMAS and (tool_choice == "required" or name == "get_weather")
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def test_tool_round_trip(client, model):
    first = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS,
                                           tool_choice="required", max_tokens=60, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    messages = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id,
                 "content": json.dumps({"temperature": 21, "sky": "clear"})}]
    answer = client.chat.completions.create(model=model, messages=messages, tools=TOOLS,
                                            max_tokens=24, temperature=0)
    choice = answer.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls
    assert "<tool_call>" not in (choice.message.content or "")
    # the tool call and its result reached the prompt
    assert answer.usage.prompt_tokens > first.usage.prompt_tokens + 20


def test_unknown_fields_are_accepted(client, model):
    out = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
        extra_body={"frobnicate": True, "top_a": 0.1, "cache_prompt": True})
    assert out.choices[0].message.content is not None


@pytest.mark.parametrize("fmt, param", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}},
     "response_format"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}, "response_format"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format"),
])
def test_bad_schemas_get_400(client, model, fmt, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=ASK, max_tokens=4,
                                       response_format=fmt)
    assert info.value.body["param"] == param


def test_logit_bias_is_honoured(server, client, model):
    [token] = httpx.post(server.url + "tokenize",
                         json={"prompt": " Paris", "add_special_tokens": False}).json()["tokens"]
    out = client.completions.create(model=model, prompt="The", max_tokens=4, temperature=0,
                                    logit_bias={str(token): 100})
    assert out.choices[0].text == " Paris" * 4


def test_unconstrained_requests_unchanged_beside_constrained(server, model):
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    free = dict(model=model, max_tokens=10, temperature=0, logprobs=0)

    async def run(constrained: bool) -> list[list[str]]:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="x",
                                      max_retries=0, timeout=300) as aclient:
            jobs = [aclient.completions.create(prompt=p, **free) for p in prompts]
            if constrained:
                jobs += [aclient.completions.create(
                    model=model, prompt=f"Person {i}:", max_tokens=30, temperature=0,
                    extra_body={"structured_outputs": {"json": PERSON}}) for i in range(2)]
            outs = await asyncio.gather(*jobs)
        return [o.choices[0].logprobs.tokens for o in outs[:3]]

    alone = [asyncio.run(_one(server, model, p, free)) for p in prompts]
    assert asyncio.run(run(constrained=True)) == alone


async def _one(server, model, prompt, free) -> list[str]:
    async with openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0,
                                  timeout=300) as aclient:
        out = await aclient.completions.create(prompt=prompt, **free)
    return out.choices[0].logprobs.tokens


def test_langchain_tool_call_end_to_end(server, model):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str, unit: str) -> str:
        """Current weather in a city, in celsius or fahrenheit."""
        return json.dumps({"city": city, "temperature": 21, "unit": unit})

    llm = ChatOpenAI(model=model, base_url=server.base_url, api_key="unused", temperature=0,
                     max_tokens=48, max_retries=0)
    bound = llm.bind_tools([get_weather], tool_choice="get_weather", strict=True)
    question = HumanMessage("What is the weather in Paris?")
    reply = bound.invoke([question])
    [call] = reply.tool_calls
    assert call["name"] == "get_weather" and set(call["args"]) == {"city", "unit"}
    result = ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])
    final = llm.bind_tools([get_weather]).invoke([question, reply, result])
    assert final.content or final.tool_calls
