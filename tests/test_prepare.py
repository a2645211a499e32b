"""engine/prepare.py: the one check of a request, shared by the offline API, the HTTP API and the
UI (the scheduler trusts what it passes)."""

import pytest
from fake_engine import FakeTokenizer

from hearth import SamplingParams
from hearth.engine.prepare import ModelInfo, prepare

MODEL = ModelInfo("m", max_model_len=16, vocab_size=FakeTokenizer.vocab_size,
                  tokenizer=FakeTokenizer())


def test_text_is_tokenized_and_max_tokens_filled_to_the_context():
    request = prepare(MODEL, "abc", SamplingParams(max_tokens=None))
    assert request.prompt == "abc" and request.token_ids == [1, 97, 98, 99]
    assert request.params.max_tokens == 16 - 4


def test_token_ids_pass_unchanged_and_max_tokens_is_kept():
    request = prepare(MODEL, [5, 6], SamplingParams(max_tokens=3))
    assert request.prompt is None and request.token_ids == [5, 6]
    assert request.params.max_tokens == 3


@pytest.mark.parametrize("prompt, params, match", [
    ("", SamplingParams(), "prompt must not be empty"),
    ([], SamplingParams(), "prompt must not be empty"),
    ([1, -1], SamplingParams(), r"token ids must be integers in \[0, 50000\)"),
    ([1, True], SamplingParams(), "token ids must be integers"),
    ([1, 2.0], SamplingParams(), "token ids must be integers"),
    ([1] * 16, SamplingParams(max_tokens=None), "16 tokens, but the model's context length is 16"),
    ([1] * 10, SamplingParams(max_tokens=7), "at most 6"),
])
def test_bad_requests_name_the_problem(prompt, params, match):
    with pytest.raises(ValueError, match=match):
        prepare(MODEL, prompt, params)


def test_where_names_the_prompt():
    with pytest.raises(ValueError, match=r"^prompt\[2\] has 20 tokens"):
        prepare(MODEL, [1] * 20, SamplingParams(max_tokens=None), where="prompt[2]")
