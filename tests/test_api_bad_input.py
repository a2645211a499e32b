"""Bad input against the real server: each case gets the right 4xx in OpenAI's error format, names
the field where there is one, and the server keeps serving afterwards."""

from __future__ import annotations

import httpx
import pytest
from server_harness import running_server

from hearth.appliance.settings import Settings
from hearth.cli import engine_factory

MAX_MODEL_LEN = 512
MESSAGES = [{"role": "user", "content": "Hi"}]
DEEP: dict = {"type": "object"}
_inner = DEEP
for _ in range(60):
    _inner["properties"] = {"x": {"type": "object"}}
    _inner = _inner["properties"]["x"]
F_TOOL = {"type": "function", "function": {"name": "f"}}
BIG = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 100}
                                        for i in range(1000)}}
C, CHAT = "/v1/completions", "/v1/chat/completions"


def completion(**fields):
    return {"prompt": "Hello", "max_tokens": 2, **fields}


def chat(**fields):
    return {"messages": MESSAGES, "max_tokens": 2, **fields}


# (name, method, path, body (dict, or raw bytes), status, param or None, words in the message)
CASES = [
    ("malformed JSON", "POST", C, b'{"prompt": ', 400, None, "not valid JSON"),
    ("body is a list", "POST", C, b"[1, 2]", 400, None, "JSON object"),
    ("empty body", "POST", C, b"", 400, None, "empty"),
    ("missing prompt", "POST", C, {"max_tokens": 2}, 400, "prompt", "required"),
    ("prompt is a number", "POST", C, completion(prompt=5), 400, "prompt", "must be"),
    ("prompt is empty", "POST", C, completion(prompt=""), 400, "prompt", "empty"),
    ("prompt list is empty", "POST", C, completion(prompt=[]), 400, "prompt", "empty"),
    ("token id past vocab", "POST", C, completion(prompt=[10**6]), 400, "prompt", "vocabulary"),
    ("negative token id", "POST", C, completion(prompt=[-1]), 400, "prompt", "vocabulary"),
    ("max_tokens a string", "POST", C, completion(max_tokens="ten"), 400, "max_tokens", "integer"),
    ("max_tokens zero", "POST", C, completion(max_tokens=0), 400, "max_tokens", ">= 1"),
    ("max_tokens negative", "POST", C, completion(max_tokens=-5), 400, "max_tokens", ">= 1"),
    (
        "max_tokens over context",
        "POST",
        C,
        completion(max_tokens=10**5),
        400,
        "prompt",
        f"context length {MAX_MODEL_LEN}",
    ),
    (
        "prompt over context",
        "POST",
        C,
        completion(prompt="hello " * 600, max_tokens=None),
        400,
        "prompt",
        "context length",
    ),
    ("temperature negative", "POST", C, completion(temperature=-1), 400, "temperature", ">= 0"),
    (
        "temperature a string",
        "POST",
        C,
        completion(temperature="hot"),
        400,
        "temperature",
        "number",
    ),
    ("top_p zero", "POST", C, completion(top_p=0), 400, "top_p", "(0, 1]"),
    ("top_p above one", "POST", C, completion(top_p=1.5), 400, "top_p", "(0, 1]"),
    ("top_k negative", "POST", C, completion(top_k=-2), 400, "top_k", ">= 0"),
    ("min_p above one", "POST", C, completion(min_p=2), 400, "min_p", "[0, 1]"),
    (
        "presence_penalty 3",
        "POST",
        C,
        completion(presence_penalty=3),
        400,
        "presence_penalty",
        "[-2, 2]",
    ),
    (
        "repetition_penalty 0",
        "POST",
        C,
        completion(repetition_penalty=0),
        400,
        "repetition_penalty",
        "> 0",
    ),
    ("n zero", "POST", C, completion(n=0), 400, "n", ">= 1"),
    ("n huge", "POST", C, completion(n=1000), 400, "n", "<= 128"),
    ("logprobs 50", "POST", C, completion(logprobs=50), 400, "logprobs", "<= 20"),
    ("stop empty string", "POST", C, completion(stop=[""]), 400, "stop", "non-empty"),
    ("stop a number", "POST", C, completion(stop=5), 400, "stop", "string"),
    ("seed a string", "POST", C, completion(seed="abc"), 400, "seed", "integer"),
    ("unknown model", "POST", C, completion(model="gpt-9"), 404, "model", "does not exist"),
    ("suffix, no FIM tokens", "POST", C, completion(suffix="x"), 400, "suffix", "in-the-middle"),
    ("best_of", "POST", C, completion(best_of=3), 400, "best_of", "not supported"),
    ("logit_bias 200", "POST", C, completion(logit_bias={"42": 200}), 400, "logit_bias",
     "[-100, 100]"),
    ("logit_bias key", "POST", C, completion(logit_bias={"x": 1}), 400, "logit_bias", "token id"),
    ("logit_bias past vocab", "POST", C, completion(logit_bias={"999999": 1}), 400, "logit_bias",
     "vocabulary"),
    ("completion bad regex", "POST", C, completion(structured_outputs={"regex": "(a"}), 400,
     "structured_outputs", "invalid regex"),
    ("two constraints", "POST", C, completion(structured_outputs={"regex": "a", "choice": ["b"]}),
     400, "structured_outputs", "exactly one"),
    ("guided and response_format", "POST", C,
     completion(guided_regex="a+", response_format={"type": "json_object"}), 400, "guided_regex",
     "both constrain"),
    ("guided_json not JSON", "POST", C, completion(guided_json="{nope"), 400, "guided_json",
     "not valid JSON"),
    (
        "stream_options without stream",
        "POST",
        C,
        completion(stream_options={"include_usage": True}),
        400,
        "stream_options",
        "stream is true",
    ),
    (
        "echo with logprobs",
        "POST",
        C,
        completion(echo=True, logprobs=1),
        400,
        "echo",
        "not supported",
    ),
    ("messages missing", "POST", CHAT, {"max_tokens": 2}, 400, "messages", "required"),
    ("messages empty", "POST", CHAT, chat(messages=[]), 400, "messages", "at least 1"),
    (
        "unknown role",
        "POST",
        CHAT,
        chat(messages=[{"role": "robot", "content": "x"}]),
        400,
        "messages",
        "role",
    ),
    (
        "content a number",
        "POST",
        CHAT,
        chat(messages=[{"role": "user", "content": 5}]),
        400,
        "messages",
        "must be",
    ),
    (
        "image part",
        "POST",
        CHAT,
        chat(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
                }
            ]
        ),
        400,
        "messages",
        "image_url",
    ),
    ("function message", "POST", CHAT,
     chat(messages=[{"role": "function", "name": "f", "content": "{}"}]), 400, "messages",
     "deprecated"),
    ("functions", "POST", CHAT, chat(functions=[{"name": "f"}]), 400, "functions", "tools"),
    ("tool without function", "POST", CHAT, chat(tools=[{"type": "function"}]), 400, "tools",
     "required"),
    ("tool type", "POST", CHAT, chat(tools=[{"type": "web", "function": {"name": "f"}}]), 400,
     "tools", "function"),
    ("tool name", "POST", CHAT, chat(tools=[{"type": "function", "function": {"name": "a b"}}]),
     400, "tools", "letters"),
    ("tool names twice", "POST", CHAT, chat(tools=[F_TOOL, F_TOOL]), 400, "tools", "twice"),
    ("tool_choice unknown", "POST", CHAT, chat(tool_choice="always"), 400, "tool_choice", "auto"),
    ("tool_choice without tools", "POST", CHAT, chat(tool_choice="required"), 400, "tool_choice",
     "needs tools"),
    ("tool_choice names another", "POST", CHAT,
     chat(tools=[{"type": "function", "function": {"name": "f"}}],
          tool_choice={"type": "function", "function": {"name": "g"}}), 400, "tool_choice",
     "not among"),
    ("tool schema invalid", "POST", CHAT,
     chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}],
          tool_choice="required"), 400, "tools", "invalid JSON schema"),
    ("tool call arguments not a string", "POST", CHAT,
     chat(messages=[{"role": "assistant", "tool_calls": [
         {"id": "1", "type": "function", "function": {"name": "f", "arguments": {}}}]}]), 400,
     "messages", "string"),
    ("response_format type", "POST", CHAT, chat(response_format={"type": "xml"}), 400,
     "response_format", "json_schema"),
    ("json schema invalid", "POST", CHAT,
     chat(response_format={"type": "json_schema",
                           "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}),
     400, "response_format", "invalid JSON schema"),
    ("json schema too deep", "POST", CHAT,
     chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": DEEP}}),
     400, "response_format", "levels deep"),
    ("json schema too big", "POST", CHAT,
     chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": BIG}}),
     400, "response_format", "characters"),
    ("schema with forced tool", "POST", CHAT,
     chat(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="required",
          response_format={"type": "json_object"}), 400, "response_format", "forces a tool call"),
    ("chat_template_kwargs messages", "POST", CHAT, chat(chat_template_kwargs={"messages": []}),
     400, "chat_template_kwargs", "may not set"),
    ("reasoning_effort", "POST", CHAT, chat(reasoning_effort="extreme"), 400, "reasoning_effort",
     "low"),
    (
        "json_schema",
        "POST",
        CHAT,
        chat(response_format={"type": "json_schema"}),
        400,
        "response_format",
        "json_schema",
    ),
    (
        "top_logprobs without logprobs",
        "POST",
        CHAT,
        chat(top_logprobs=2),
        400,
        "top_logprobs",
        "logprobs",
    ),
    (
        "top_logprobs 50",
        "POST",
        CHAT,
        chat(logprobs=True, top_logprobs=50),
        400,
        "top_logprobs",
        "[0, 20]",
    ),
    (
        "max_completion_tokens 0",
        "POST",
        CHAT,
        chat(max_completion_tokens=0),
        400,
        "max_tokens",
        ">= 1",
    ),
    ("stream a string", "POST", CHAT, chat(stream="yes"), 400, "stream", "boolean"),
    ("chat unknown model", "POST", CHAT, chat(model="llama-70b"), 404, "model", "does not exist"),
    ("unknown route", "GET", "/v1/engines", None, 404, None, "no such route"),
    ("wrong method", "GET", C, None, 405, None, "Method Not Allowed"),
    ("tokenize nothing", "POST", "/tokenize", {}, 400, "prompt", "exactly one"),
    ("detokenize bad id", "POST", "/detokenize", {"tokens": [-3]}, 400, "tokens", "vocabulary"),
    # Issue 20: no single request stalls the server (appliance/body_limit.py, request_limits.py)
    ("body over the size cap", "POST", C, b"x" * (3 << 19), 413, None, "max-request-body-mib"),
    ("chat body over the size cap", "POST", CHAT, b" " * (3 << 19), 413, None, "larger than"),
    ("prompt too long by its characters", "POST", C, completion(prompt="ab" * 100_000), 400,
     "prompt", "characters"),
    ("chat too long by its characters", "POST", CHAT,
     chat(messages=[{"role": "user", "content": "ab" * 100_000}]), 400, "messages", "characters"),
    ("tokenize too long", "POST", "/tokenize", {"prompt": "ab" * 100_000}, 400, "prompt",
     "characters"),
    ("too many stop strings", "POST", C, completion(stop=["x"] * 65), 400, "stop", "at most 64"),
    ("stop strings too long", "POST", CHAT, chat(stop=["y" * 9000] * 2), 400, "stop",
     "characters in all"),
    ("too many logit_bias entries", "POST", C,
     completion(logit_bias={str(i): 1 for i in range(1025)}), 400, "logit_bias", "at most 1024"),
    ("too many tools", "POST", CHAT, chat(tools=[F_TOOL] * 257), 400, "tools", "at most 256"),
    ("too many messages", "POST", CHAT, chat(messages=MESSAGES * 2049), 400, "messages",
     "at most 2048"),
    ("too many prompts", "POST", C, completion(prompt=["a"] * 257), 400, "prompt", "at most 256"),
]


@pytest.fixture(scope="module")
def http():
    settings = Settings(device="cpu", max_model_len=MAX_MODEL_LEN, max_request_body_mib=1.0,
                        no_ui=True)
    with (
        running_server(settings, engine_factory(settings)) as server,
        httpx.Client(base_url=server.url, timeout=120) as client,
    ):
        yield client


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_openai_error(http, case):
    _, method, path, body, status, param, words = case
    if isinstance(body, bytes):
        response = http.request(
            method, path, content=body, headers={"Content-Type": "application/json"}
        )
    else:
        response = http.request(method, path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"]
    if param is not None:
        assert error["param"] == param
    assert http.get("/health").status_code == 200


def test_server_still_answers_and_ignores_bookkeeping_fields(http):
    body = completion(user="u-1", metadata={"k": "v"}, store=False, temperature=0)
    response = http.post(C, json=body)
    assert response.status_code == 200 and response.json()["choices"][0]["text"]
    chat_body = chat(
        user="u-1",
        parallel_tool_calls=False,
        tool_choice="none",
        response_format={"type": "text"},
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": "Hello!", "tool_calls": None, "refusal": None},
            {"role": "user", "content": "Bye"},
        ],
    )
    assert http.post(CHAT, json=chat_body).status_code == 200


def test_unknown_fields_are_accepted_and_logged_once(http, caplog):
    body = completion(frobnicate=True, temperature=0,
                      stream_options=None, structured_outputs={"regex": "[ab]{2}", "future": 1})
    with caplog.at_level("WARNING", logger="hearth.server"):
        for _ in range(2):
            response = http.post(C, json=body)
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] in ("aa", "ab", "ba", "bb")
        chat_body = chat(messages=[{"role": "user", "content": "Hi", "mood": "happy"}],
                         frobnicate=2)
        assert http.post(CHAT, json=chat_body).status_code == 200
    warned = [r.getMessage() for r in caplog.records if "unknown request field" in r.getMessage()]
    assert sorted(warned) == sorted([
        "ignoring unknown request field 'frobnicate' (logged once per field name)",
        "ignoring unknown request field 'structured_outputs.future' (logged once per field name)",
        "ignoring unknown request field 'messages[].mood' (logged once per field name)",
    ])
