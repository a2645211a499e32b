"""The OpenAI API with the real default model on CPU, through the official `openai` client over
real HTTP: answers, streaming, n, stop strings, seeds, usage, logprobs, concurrency, disconnects,
auth, and the Host/Origin defences. One server for the module (the model loads once)."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from server_harness import metric, running_server

from hearth.appliance.settings import Settings
from hearth.cli import engine_factory

KEY = "sk-hearth-test"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server():
    settings = Settings(device="cpu", api_key=KEY, no_ui=True)
    with running_server(settings, engine_factory(settings)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def _metrics(server) -> str:
    return httpx.get(server.url + "metrics").text


def _wait_cache_free(server, timeout_s: float = 60.0) -> str:
    """Poll /metrics until nothing runs, waits, or holds a KV block; return the last scrape."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = _metrics(server)
        busy = [
            metric(text, name)
            for name in (
                "vllm:num_requests_running",
                "vllm:num_requests_waiting",
                "vllm:kv_cache_usage_perc",
            )
        ]
        if busy == [0, 0, 0]:
            return text
        assert time.monotonic() < deadline, f"still busy after {timeout_s} s: {busy}"
        time.sleep(0.2)


def test_models_lists_the_default_model(client):
    [entry] = client.models.list().data
    assert entry.id == "smollm2-135m-instruct" and entry.owned_by == "hearth"
    assert entry.max_model_len == 8192 and entry.capabilities == ["completion"]  # no FIM tokens


def test_chat_answers_with_usage_and_logprobs(client, model, server):
    out = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=24, logprobs=True, top_logprobs=2
    )
    choice = out.choices[0]
    assert "Paris" in choice.message.content and choice.finish_reason == "stop"
    prompt = httpx.post(
        server.url + "tokenize",
        json={"messages": QUESTION},
        headers={"Authorization": f"Bearer {KEY}"},
    ).json()
    assert out.usage.prompt_tokens == prompt["count"]
    assert out.usage.completion_tokens == len(choice.logprobs.content)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    for entry in choice.logprobs.content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


def test_streamed_text_equals_whole_text_greedy(client, model):
    chat = dict(model=model, messages=QUESTION, temperature=0, max_tokens=12)
    whole = client.chat.completions.create(**chat)
    chunks = list(
        client.chat.completions.create(stream=True, **chat, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[
        0
    ].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens

    plain = dict(model=model, prompt="The three primary colors are", temperature=0, max_tokens=8)
    whole = client.completions.create(**plain)
    pieces = [c.choices[0].text for c in client.completions.create(stream=True, **plain)]
    assert "".join(pieces) == whole.choices[0].text and len(pieces) > 1
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 8

    echoed = client.completions.create(echo=True, logprobs=None, **plain).choices[0].text
    assert echoed == plain["prompt"] + whole.choices[0].text
    logprobs = client.completions.create(logprobs=3, **plain).choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 8
    assert all(len(top) <= 3 for top in logprobs.top_logprobs)
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    assert max(logprobs.top_logprobs[0].values()) == pytest.approx(logprobs.token_logprobs[0])


def test_n2_and_seeds_are_reproducible(client, model):
    def sample(seed):
        out = client.chat.completions.create(
            model=model,
            messages=QUESTION,
            n=2,
            seed=seed,
            temperature=1.0,
            max_tokens=6,
            logprobs=True,
        )
        assert sorted(c.index for c in out.choices) == [0, 1]
        tokens = sum(len(c.logprobs.content) for c in out.choices)
        assert out.usage.completion_tokens == tokens
        return [c.message.content for c in sorted(out.choices, key=lambda c: c.index)]

    first = sample(1234)
    assert sample(1234) == first
    assert sample(1) != first  # 2 x 6 tokens at temperature 1: equal by chance ~never

    plain = dict(model=model, prompt="Once upon a time", temperature=1.2, max_tokens=6)
    assert (
        client.completions.create(seed=5, **plain).choices[0].text
        == client.completions.create(seed=5, **plain).choices[0].text
    )


def test_stop_strings(client, model):
    plain = dict(model=model, prompt="The capital of France is", temperature=0, max_tokens=16)
    text = client.completions.create(**plain).choices[0].text
    stop = text.strip().split()[1]  # the second word of the greedy answer
    out = client.completions.create(stop=[stop, "never-appears"], **plain).choices[0]
    assert out.text == text[: text.index(stop)]
    assert out.finish_reason == "stop" and out.model_extra["stop_reason"] == stop


def test_64_concurrent_streaming_chats_then_cache_is_free(client, model, server):
    async def run_all() -> list[tuple[str, str]]:
        async_client = openai.AsyncOpenAI(
            base_url=server.base_url, api_key=KEY, max_retries=0, timeout=600
        )

        async def chat(i: int) -> tuple[str, str]:
            messages = [{"role": "user", "content": f"Say a word about the number {i}."}]
            stream = await async_client.chat.completions.create(
                model=model, messages=messages, max_tokens=5, stream=True, temperature=0.7, seed=i
            )
            text, reason = "", None
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    reason = chunk.choices[0].finish_reason or reason
            return text, reason

        async with async_client:
            return await asyncio.gather(*(chat(i) for i in range(64)))

    results = asyncio.run(run_all())
    assert len(results) == 64
    assert all(reason in ("stop", "length") for _, reason in results)
    assert sum(bool(text) for text, _ in results) > 32
    _wait_cache_free(server)


def test_20_clients_disconnecting_mid_stream_free_their_blocks(server, model):
    before = metric(_metrics(server), "vllm:generation_tokens_total")
    body = {
        "model": model,
        "prompt": "Write a very long story about a dragon.",
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
    }

    async def leave_early(http: httpx.AsyncClient) -> None:
        async with http.stream("POST", "/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: ") and '"text":""' not in line:
                    return  # hang up after the first piece of text

    async def run_all() -> None:
        async with httpx.AsyncClient(
            base_url=server.base_url, timeout=300, headers={"Authorization": f"Bearer {KEY}"}
        ) as http:
            await asyncio.gather(*(leave_early(http) for _ in range(20)))

    asyncio.run(run_all())
    text = _wait_cache_free(server, timeout_s=30)
    generated = metric(text, "vllm:generation_tokens_total") - before
    assert generated < 20 * 400 / 4  # aborted long before max_tokens
    assert server.context.engine.num_in_flight == 0


def test_auth_no_key_wrong_key_right_key(server, model):
    for key in ("", "sk-wrong"):
        bad = openai.OpenAI(
            base_url=server.base_url,
            api_key=key or "unused",
            max_retries=0,
            default_headers={"Authorization": ""} if not key else None,
        )
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=model, prompt="hi", max_tokens=1)
    good = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
    assert good.completions.create(model=model, prompt="hi", max_tokens=1).choices


def test_foreign_host_refused_and_no_cors_for_unlisted_origin(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    url = server.url + "v1/models"
    rebinding = httpx.get(url, headers={**auth, "Host": "attacker.example"})
    assert rebinding.status_code == 403
    assert rebinding.json()["error"]["message"].startswith("Host 'attacker.example'")
    cross = httpx.get(url, headers={**auth, "Origin": "https://attacker.example"})
    assert cross.status_code == 403
    assert not any(h.startswith("access-control-") for h in cross.headers)
    preflight = httpx.options(
        url, headers={"Origin": "https://attacker.example", "Access-Control-Request-Method": "POST"}
    )
    assert not any(h.startswith("access-control-") for h in preflight.headers)
    assert httpx.get(url, headers=auth).status_code == 200


def test_suffix_without_fim_tokens_is_a_400_naming_fill_in_the_middle(client, model, server):
    """The default model has no FIM tokens: never a silently wrong prompt."""
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=model, prompt="def f(x):\n    ", suffix="\n", max_tokens=4)
    assert "fill-in-the-middle" in error.value.message and error.value.param == "suffix"
    for alias in ("v1/completions", "v1/fim/completions"):
        plain = httpx.post(
            server.url + alias,
            json={"prompt": "def f(", "suffix": "", "max_tokens": 1},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=60,
        )
        assert plain.status_code == 200, plain.text  # an empty suffix is a plain completion
