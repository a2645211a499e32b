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


# ---- the native stream (tokenizers' DecodeStream) against the Python window ----

class _PythonOnly:
    """The same tokenizer without `decode_stream`: the detokenizer's Python window."""

    def __init__(self, tokenizer) -> None:
        self.decode = tokenizer.decode


def _vocabularies():
    from pathlib import Path

    from gguf import GGUFReader

    from hearth.engine.tokenizer import Tokenizer

    data = Path(__file__).parent / "data" / "gguf"
    yield "default (byte-level BPE)", load_model_source(resolve_model(None)).tokenizer
    for name in ("llama-F16.gguf", "gemma2-F16.gguf", "phi3-F16.gguf"):  # SentencePiece kinds
        yield name, Tokenizer.from_gguf_metadata(GGUFReader(data / name))


HARD = [*TEXTS, " leading space", "\n\nnewlines first", "byte fallback: \u2603\u0000\U0001f600"]


@pytest.mark.parametrize("skip_special", [True, False])
def test_native_stream_equals_the_python_window(skip_special):
    for name, tok in _vocabularies():
        assert tok.decode_stream([1], skip_special) is not None, name  # the lock's tokenizers
        for prompt in ("", "Say:", "Say: "):
            for text in HARD:
                ids = tok.encode(text, add_special_tokens=False)
                ids = [*ids, *tok.eos_token_ids, 10**7]  # a special token, an id past the vocab
                params = SamplingParams(stop=["zz"], skip_special_tokens=skip_special)
                native = IncrementalDetokenizer(tok, tok.encode(prompt), params)
                python = IncrementalDetokenizer(_PythonOnly(tok), tok.encode(prompt), params)
                for token_id in ids:
                    assert native.add_token(token_id) == python.add_token(token_id)
                    assert native.output_text == python.output_text, (name, prompt, text)


def test_native_stream_equals_the_python_window_on_random_ids():
    """Random ids (what a model with random weights samples) make tokenizers' stream refuse a
    token now and then ("Invalid prefix encountered"): the detokenizer goes on in Python, with
    the same text."""
    import random

    rng = random.Random(0)
    for name, tok in _vocabularies():
        vocab = tok._backend.get_vocab_size()
        for _ in range(100):
            ids = [rng.randrange(vocab) for _ in range(60)]
            native = IncrementalDetokenizer(tok, [rng.randrange(vocab)], SamplingParams())
            python = IncrementalDetokenizer(_PythonOnly(tok), native.ids[:1], SamplingParams())
            for token_id in ids:
                assert native.add_token(token_id) == python.add_token(token_id)
            assert native.output_text == python.output_text, name


def test_native_stream_stops_like_the_python_window(tokenizer):
    params = SamplingParams(stop=["forty-two"])
    ids = tokenizer.encode("The answer is forty-two, and that is final.")
    native = IncrementalDetokenizer(tokenizer, tokenizer.encode("Q:"), params)
    python = IncrementalDetokenizer(_PythonOnly(tokenizer), tokenizer.encode("Q:"), params)
    for token_id in ids:
        stopped = native.add_token(token_id)
        assert python.add_token(token_id) == stopped
        if stopped:
            break
    assert stopped and native.stop_reason == python.stop_reason == "forty-two"
    assert native.output_text == python.output_text == "The answer is "


def test_an_older_tokenizers_falls_back_to_the_python_window(tokenizer, monkeypatch):
    """pyproject admits tokenizers >= 0.20: without DecodeStream (< 0.21) or its `ids`
    (< 0.22) the detokenizer runs the Python window, with the same text."""
    from hearth.engine import tokenizer as tokenizer_module

    expected = _run(tokenizer, "Say:", TEXTS[1], SamplingParams())[0].output_text
    for stand_in in (None, lambda skip_special_tokens=False: None):  # absent / no `ids`
        if stand_in is None:
            monkeypatch.delattr(tokenizer_module.decoders, "DecodeStream")
        else:
            monkeypatch.setattr(tokenizer_module.decoders, "DecodeStream", stand_in,
                                raising=False)
        assert tokenizer.decode_stream([1], True) is None
        assert _run(tokenizer, "Say:", TEXTS[1], SamplingParams())[0].output_text == expected
