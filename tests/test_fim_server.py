"""Fill-in-the-middle end to end: tiny random models whose tokenizers carry a family's FIM tokens
(StarCoder-, Qwen- and CodeLlama-style), served by the real engine, through the `openai` client.

The layout is checked by its result: a FIM request and a request whose prompt is the layout's
token ids, built here by hand, give the same greedy text. Keystrokes: a cancelled request gives
its blocks back, and the next keystroke's request reuses the cached file prefix."""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import openai
import pytest
from helpers import add_fim_tokens, save_tiny_model
from server_harness import running_server

from hearth.appliance.settings import Settings
from hearth.cli import engine_factory

# Byte-level tiny tokenizer: one token per byte, so token counts are character counts.
PREFIX = "def area(r):\n    # the area of a circle of radius r, in square units\n    return "
SUFFIX = "\n\n\nprint(area(2.0))\n"
BLOCK_SIZE = 16
MODEL = "tiny"  # --served-model-name
EOS = {"ignore_eos": True}
FAMILIES = {"starcoder": "llama", "qwen": "qwen2", "codellama": "llama"}
SENTINELS = {
    "starcoder": ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    "qwen": ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    "codellama": ("▁<PRE>", "▁<SUF>", "▁<MID>"),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def served(request, tmp_path_factory):
    family = request.param
    path = save_tiny_model(tmp_path_factory.mktemp(family), FAMILIES[family])
    ids = add_fim_tokens(path, family)
    settings = Settings(model=str(path), device="cpu", no_ui=True, served_model_name=(MODEL,))
    with running_server(settings, engine_factory(settings)) as server:
        yield family, ids, server


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def _tokens(server, text: str) -> list[int]:
    body = {"prompt": text, "add_special_tokens": False}
    return httpx.post(server.url + "tokenize", json=body).json()["tokens"]


def _used_blocks(server) -> int:
    return server.context.engine.snapshot().scheduler.blocks.num_used


def test_fim_prompt_is_the_family_layout_and_usage_counts_it(served):
    family, ids, server = served
    client = _client(server)
    model = client.models.list().data[0].id
    assert model == MODEL
    fim = client.completions.create(
        model=model, prompt=PREFIX, suffix=SUFFIX, max_tokens=8, temperature=0, extra_body=EOS
    )
    prefix_ids, suffix_ids = _tokens(server, PREFIX), _tokens(server, SUFFIX)
    assert fim.usage.prompt_tokens == len(prefix_ids) + len(suffix_ids) + 3
    pre, suf, mid = (ids[name] for name in SENTINELS[family])
    by_hand = client.completions.create(
        model=model, prompt=[pre, *prefix_ids, suf, *suffix_ids, mid], max_tokens=8,
        temperature=0, extra_body=EOS,
    )
    assert fim.choices[0].text == by_hand.choices[0].text
    assert fim.usage.completion_tokens == 8


def test_streamed_fim_and_the_fim_alias_give_the_same_text(served):
    _, _, server = served
    client = _client(server)
    args = dict(prompt=PREFIX, suffix=SUFFIX, max_tokens=6, temperature=0)
    whole = client.completions.create(model=MODEL, extra_body=EOS, **args).choices[0].text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model=MODEL, stream=True, extra_body=EOS, **args)
    )
    assert streamed == whole
    alias = httpx.post(server.url + "v1/fim/completions", json={**args, **EOS}, timeout=60).json()
    assert alias["choices"][0]["text"] == whole and alias["object"] == "text_completion"


def test_fim_needs_a_text_prompt_and_no_echo(served):
    _, _, server = served
    client = _client(server)
    with pytest.raises(openai.BadRequestError, match="needs the prompt as text"):
        client.completions.create(model=MODEL, prompt=[5, 6], suffix="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="echo cannot be combined with suffix"):
        client.completions.create(model=MODEL, prompt="a", suffix="x", echo=True, max_tokens=2)


def test_keystrokes_cancel_free_blocks_and_reuse_the_cached_prefix(served):
    """Each keystroke cancels the last request (the client hangs up mid-stream) and sends the
    prefix one character longer. psm puts the suffix after the cursor, so the second request
    reuses exactly the full blocks of [PRE] + prefix, and recomputes the suffix."""
    _, _, server = served
    body = {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 200, "ignore_eos": True,
            "stream": True}

    async def keystroke(http: httpx.AsyncClient) -> None:
        async with http.stream("POST", "/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    return  # the next keystroke: hang up

    async def type_one() -> None:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:
            await keystroke(http)

    asyncio.run(type_one())
    _wait(lambda: _used_blocks(server) == 0 and server.context.engine.num_in_flight == 0)
    typed = PREFIX + "3"
    out = _client(server).completions.create(
        model=MODEL, prompt=typed, suffix=SUFFIX, max_tokens=2, temperature=0
    )
    num_before_cursor = 1 + len(_tokens(server, typed))  # [PRE] + prefix
    cached = out.usage.prompt_tokens_details.cached_tokens
    assert cached == (num_before_cursor - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert cached < num_before_cursor  # the suffix, after the cursor, is computed again


def _wait(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def spm_server(tmp_path_factory):
    """A catalogue entry that asks for the suffix-first layout (models.toml fim_order)."""
    root = tmp_path_factory.mktemp("spm")
    path = save_tiny_model(root / "model", "llama")
    add_fim_tokens(path, "starcoder")
    toml = root / "models.toml"
    toml.write_text(f'[models.tiny-coder]\nsource = "hf"\npath = "{path}"\nfim_order = "spm"\n')
    old = os.environ.get("HEARTH_MODELS_TOML")
    os.environ["HEARTH_MODELS_TOML"] = str(toml)
    try:
        settings = Settings(model="tiny-coder", device="cpu", no_ui=True,
                            served_model_name=(MODEL,))
        with running_server(settings, engine_factory(settings)) as server:
            yield server
    finally:
        if old is None:
            del os.environ["HEARTH_MODELS_TOML"]
        else:
            os.environ["HEARTH_MODELS_TOML"] = old


def test_spm_layout_keeps_the_suffix_cached_across_keystrokes(spm_server):
    client = _client(spm_server)
    client.completions.create(model=MODEL, prompt=PREFIX, suffix=SUFFIX, max_tokens=1)
    typed = PREFIX + "3"
    out = client.completions.create(model=MODEL, prompt=typed, suffix=SUFFIX, max_tokens=1)
    # [PRE][SUF] suffix [MID] prefix: all but the block holding the new character is cached.
    num_tokens = out.usage.prompt_tokens
    assert num_tokens == 3 + len(_tokens(spm_server, typed)) + len(_tokens(spm_server, SUFFIX))
    cached = out.usage.prompt_tokens_details.cached_tokens
    assert cached == (num_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert cached > 3 + len(_tokens(spm_server, SUFFIX))


def test_capabilities_say_insert_and_ollama_generate_fills_the_middle(served):
    """What Continue does over the Ollama API: /api/show's template mentions .Suffix, then
    /api/generate with prompt + suffix is the same fill as /v1/completions."""
    import ollama

    family, _, server = served
    assert _client(server).models.list().data[0].capabilities == ["completion", "insert"]
    client = ollama.Client(host=server.url, timeout=60)
    shown = client.show(MODEL)
    assert shown.capabilities == ["completion", "insert"] and ".Suffix" in shown.template
    options = {"temperature": 0, "num_predict": 6}
    fill = client.generate(model=MODEL, prompt=PREFIX, suffix=SUFFIX, options=options)
    same = _client(server).completions.create(
        model=MODEL, prompt=PREFIX, suffix=SUFFIX, max_tokens=6, temperature=0
    )
    assert fill.response == same.choices[0].text
    assert fill.prompt_eval_count == same.usage.prompt_tokens
