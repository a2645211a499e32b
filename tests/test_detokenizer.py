"""Incremental detokenization equals a full decode; stop strings spanning tokens; hold-back."""

from __future__ import annotations

import pytest

from hearth.engine.catalog import resolve_model
from hearth.engine.detokenizer import IncrementalDetokenizer
from hearth.engine.loader import load_model_source
from hearth.engine.sampling_params import SamplingParams

TEXTS = [
    "Hello, world! How are you today?",
    "Emoji 🤗🎉 and CJK 你好世界 and accents: café naïve",
    "def f(x):\n    return x ** 2  # square\n",
    "   leading spaces and\ttabs\n\nnew lines",
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_model_source(resolve_model(None)).tokenizer


def _run(tokenizer, prompt: str, text: str, params: SamplingParams):
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt), params)
    visible = []
    stopped = False
    for token_id in tokenizer.encode(text):
        stopped = detok.add_token(token_id)
        visible.append(detok.visible_text(stopped))
        if stopped:
            break
    return detok, visible, stopped


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_equals_full_decode(tokenizer, text):
    detok, visible, _ = _run(tokenizer, "Say:", text, SamplingParams())
    assert detok.output_text == tokenizer.decode(tokenizer.encode(text))
    assert all(a == b[: len(a)] for a, b in zip(visible, visible[1:]))  # text only grows


def test_stop_string_spanning_tokens(tokenizer):
    text = "The answer is forty-two, and that is final."
    detok, visible, stopped = _run(tokenizer, "Q:", text, SamplingParams(stop=["forty-two"]))
    assert stopped and detok.stop_reason == "forty-two"
    assert detok.output_text == "The answer is "
    assert all("forty" not in v for v in visible)  # never streamed, even partially


def test_include_stop_string_and_earliest_wins(tokenizer):
    params = SamplingParams(stop=["final", "answer"], include_stop_str_in_output=True)
    detok, _, stopped = _run(tokenizer, "Q:", "The answer is final.", params)
    assert stopped and detok.output_text == "The answer"


def test_hold_back_releases_text_when_finished(tokenizer):
    params = SamplingParams(stop=["zzzz-never"])
    detok, visible, stopped = _run(tokenizer, "Q:", "Short reply", params)
    assert not stopped
    assert len(visible[-1]) < len(detok.output_text)
    assert detok.visible_text(finished=True) == "Short reply"
