"""No single request stalls the server (issue 20, item 7), over real HTTP with a fake engine:
the body-size cap (413 before the body is read, declared or chunked), prompts refused by their
length before tokenizing, the bounds on stop / logit_bias / tools / messages (400 naming the
field), and tokenizing off the event loop (/health and a small completion keep answering while
oversized or slow requests are handled)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import httpx
import pytest
from fake_engine import FakeEngine
from server_harness import running_server

from hearth.appliance.protocol import ChatCompletionRequest
from hearth.appliance.request_limits import (
    MAX_LOGIT_BIAS,
    MAX_MESSAGES,
    MAX_PROMPTS,
    MAX_STOP,
    MAX_STOP_CHARS,
    MAX_TOOLS,
    check_request_limits,
)
from hearth.appliance.request_stream import QueueFullError
from hearth.appliance.settings import Settings
from hearth.appliance.tokenize_pool import TokenizePool

BODY_MIB = 1.0
CAP = int(BODY_MIB * (1 << 20))
MAX_MODEL_LEN = 256
MAX_CHARS = MAX_MODEL_LEN * 1 * 3  # FakeTokenizer: one character a token; engine/prepare.py


class _Engine(FakeEngine):
    """FakeEngine whose tokenizer counts its calls and sleeps on "SLOW" (a slow tokenizer)."""

    def __init__(self) -> None:
        super().__init__(max_model_len=MAX_MODEL_LEN, max_num_seqs=4)
        self.model_info = dataclasses.replace(self.model_info, max_token_chars=1)
        self.encoded_chars = 0
        encode = self.tokenizer.encode

        def counting_encode(text: str, add_special_tokens: bool = True) -> list[int]:
            self.encoded_chars += len(text)
            if "SLOW" in text:
                time.sleep(2.0)
            return encode(text, add_special_tokens)

        self.tokenizer.encode = counting_encode


@pytest.fixture(scope="module")
def engine():
    return _Engine()


@pytest.fixture(scope="module")
def server(engine):
    settings = Settings(max_num_seqs=4, max_request_body_mib=BODY_MIB, no_ui=True)
    with running_server(settings, lambda: engine) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def _complete(http, **fields):
    return http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, **fields})


def _chat(http, **fields):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}
    return http.post("/v1/chat/completions", json=body)


def test_declared_body_over_the_cap_is_413_unread(http):
    response = http.post("/v1/completions", content=b"x" * (CAP + 1),
                         headers={"content-type": "application/json"})
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "request_too_large" and "--max-request-body-mib" in error["message"]


def test_chunked_body_over_the_cap_is_413(http):
    def chunks():  # no Content-Length: Transfer-Encoding chunked
        for _ in range(CAP // 65536 + 2):
            yield b" " * 65536

    response = http.post("/v1/chat/completions", content=chunks(),
                         headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_ollama_route_413_in_ollama_format(http):
    response = http.post("/api/generate", content=b"x" * (CAP + 10))
    assert response.status_code == 413 and "max-request-body-mib" in response.json()["error"]


def test_body_under_the_cap_still_works(http):
    assert _complete(http, prompt="a" * 100).status_code == 200


def test_prompt_too_long_by_characters_is_400_before_tokenizing(http, engine):
    before = engine.encoded_chars
    response = _complete(http, prompt="a" * (MAX_CHARS + 1))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "prompt" and "characters" in error["message"]
    assert engine.encoded_chars == before  # the tokenizer never saw it
    batch = _complete(http, prompt=["ok", "b" * (MAX_CHARS + 1)])
    assert batch.status_code == 400 and batch.json()["error"]["param"] == "prompt"
    # At the bound, the text is tokenized and the token check speaks (the usual 400).
    at_bound = _complete(http, prompt="c" * MAX_CHARS)
    assert at_bound.status_code == 400 and "tokens" in at_bound.json()["error"]["message"]
    assert engine.encoded_chars > before


def test_chat_and_tokenize_too_long_by_characters(http, engine):
    long = "d" * (MAX_CHARS + 1)
    before = engine.encoded_chars
    response = _chat(http, messages=[{"role": "user", "content": long}])
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    tokenized = http.post("/tokenize", json={"prompt": long})
    assert tokenized.status_code == 400 and "characters" in tokenized.json()["error"]["message"]
    assert engine.encoded_chars == before


@pytest.mark.parametrize(("field", "value"), [
    ("stop", ["s"] * (MAX_STOP + 1)),
    ("stop", "x" * (MAX_STOP_CHARS + 1)),
    ("logit_bias", {str(i): 1.0 for i in range(MAX_LOGIT_BIAS + 1)}),
    ("stop_token_ids", [5] * 1025),
])
def test_sampling_bounds_are_400_naming_the_field(http, field, value):
    for send in (_complete, _chat):
        response = send(http, **{field: value})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == field


def test_tools_messages_and_prompts_are_bounded(http):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    many = _chat(http, tools=[tool] * (MAX_TOOLS + 1))
    assert many.status_code == 400 and many.json()["error"]["param"] == "tools"
    big = {"type": "function", "function": {"name": "f", "description": "z" * 300_000}}
    assert _chat(http, tools=[big]).json()["error"]["param"] == "tools"
    messages = [{"role": "user", "content": "m"}] * (MAX_MESSAGES + 1)
    response = _chat(http, messages=messages)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    prompts = _complete(http, prompt=["p"] * (MAX_PROMPTS + 1))
    assert prompts.status_code == 400 and prompts.json()["error"]["param"] == "prompt"
    at_limit = ChatCompletionRequest(messages=[{"role": "user", "content": "m"}] * MAX_MESSAGES,
                                     tools=[tool] * MAX_TOOLS, stop=["s"] * MAX_STOP)
    check_request_limits(at_limit)  # at the bounds: accepted


def test_health_and_a_small_completion_answer_while_oversized_requests_are_rejected(server):
    """Maximal requests (just under the body cap; refused by length) and one over the cap, in a
    loop from 4 threads; meanwhile /health and a 2-token completion must each answer within 1 s
    (a functional timeout, not a speed measurement)."""
    maximal = b'{"prompt": "' + b"a" * (CAP - 64) + b'", "max_tokens": 2}'
    over = b"x" * (CAP * 4)
    stop = threading.Event()
    statuses: list[int] = []

    def flood(body: bytes) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            while not stop.is_set():
                statuses.append(client.post("/v1/completions", content=body,
                                            headers={"content-type": "application/json"})
                                .status_code)

    threads = [threading.Thread(target=flood, args=(b,)) for b in (maximal, maximal, over,
                                                                      maximal)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        with httpx.Client(base_url=server.url, timeout=1.0) as quick:
            for _ in range(5):
                assert quick.get("/health").status_code == 200
                small = quick.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
                assert small.status_code == 200
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert statuses and set(statuses) <= {400, 413}, set(statuses)
    assert 413 in statuses and 400 in statuses


def test_a_slow_tokenization_does_not_block_the_event_loop(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        results = []
        slow = threading.Thread(target=lambda: results.append(
            client.post("/v1/completions", json={"prompt": "SLOW", "max_tokens": 2})))
        slow.start()
        time.sleep(0.3)
        with httpx.Client(base_url=server.url, timeout=1.0) as quick:
            assert quick.get("/health").status_code == 200
        slow.join(30)
    assert results[0].status_code == 200


def test_tokenize_pool_bounds_and_errors():
    async def main() -> None:
        pool = TokenizePool(max_workers=1, max_waiting=1)
        gate = threading.Event()
        first = asyncio.ensure_future(pool.run(gate.wait, 5))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(pool.run(lambda: "second"))
        await asyncio.sleep(0.05)
        assert pool.num_waiting == 1
        with pytest.raises(QueueFullError):
            await pool.run(lambda: "third")
        gate.set()
        assert await first is True and await second == "second"
        with pytest.raises(ZeroDivisionError):
            await pool.run(lambda: 1 / 0)
        pool.shutdown()

    asyncio.run(main())
    with pytest.raises(ValueError):
        TokenizePool(max_workers=0)


def test_the_loaded_heap_is_frozen_and_gc_pauses_are_counted(http):
    """Tail latency: full collections no longer walk the startup heap (appliance/gc_heap.py)."""
    import gc

    assert gc.get_freeze_count() > 1000
    gc.collect()  # one full pass, counted
    text = http.get("/metrics").text
    assert 'hearth_gc_collections_total{generation="2"}' in text
    assert "hearth_gc_pause_max_seconds" in text


def test_long_texts_are_tokenized_without_holding_the_gil():
    """engine/tokenizer.py: `tokenizers`' encode() holds the GIL, encode_batch() does not; a
    long text takes the second path (same ids), so a worker thread leaves the loop running."""
    from hearth.engine.catalog import resolve_model
    from hearth.engine.loader import load_model_source

    tokenizer = load_model_source(resolve_model(None)).tokenizer
    text = "Hearth serves a shop floor; " * 12_000
    assert tokenizer.encode(text) == tokenizer._backend.encode(text).ids
    done = threading.Event()
    worker = threading.Thread(target=lambda: (tokenizer.encode(text), done.set()))
    worker.start()
    turns = 0
    while not done.is_set():
        time.sleep(0.001)
        turns += 1
    worker.join()
    assert turns >= 10  # held GIL: 1-3 turns for the whole encode
