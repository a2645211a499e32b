"""A request checked once, before it enters the engine: `prepare(model, prompt, params)`.

Every caller goes through it: the offline LLM (`LLMEngine.add_request`), the HTTP API and the
browser UI (both through the serving layer, on the event loop, so that a bad request is a 400
before any response starts). It tokenizes a text prompt, checks token ids against the vocabulary,
and checks the prompt and `max_tokens` against the context length, filling `max_tokens` when unset.
A request with a structured output gets its grammar compiled here (engine/grammar.py, cached), off
the engine thread. The engine then trusts a PreparedRequest.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

from hearth.engine.fim import FimSpec
from hearth.engine.grammar import CompiledGrammar, GrammarCompiler
from hearth.engine.sampling_params import SamplingParams
from hearth.engine.structured_output import StructuredOutputError

_NORMALIZATION_SHRINK = 3


class TextCodec(Protocol):
    """What requests need of a tokenizer (engine/tokenizer.py's Tokenizer, or a test's fake)."""

    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs) -> str:
        ...


@dataclass(frozen=True)
class ModelInfo:
    """The served model's facts that callers above the engine need."""

    name: str
    max_model_len: int  # the longest sequence (prompt + output) the engine runs
    vocab_size: int
    tokenizer: TextCodec
    device: str = "cpu"
    dtype: str = "float32"
    grammars: GrammarCompiler | None = None  # None: this engine has no structured output
    architecture: str | None = None  # HF name, e.g. "LlamaForCausalLM"
    num_params: int | None = None
    quantization: str | None = None  # e.g. "Q4_1", "awq"; None: float weights
    fim: FimSpec | None = None  # fill-in-the-middle tokens; None: the model has none
    max_token_chars: int | None = None  # the longest token's text; None: no length pre-check


@dataclass(frozen=True)
class PreparedRequest:
    prompt: str | None  # the text, when the prompt came as text
    token_ids: list[int]
    params: SamplingParams  # max_tokens always set
    grammar: CompiledGrammar | None = None  # params.structured_output, compiled
    share_key: str | None = None  # the API key's name: its fair-share flow (engine/fair_share.py)
    share_weight: float = 1.0  # that key's weight in the fair share


def prepare(
    model: ModelInfo, prompt: str | list[int], params: SamplingParams, where: str = "prompt"
) -> PreparedRequest:
    """Tokenize and check one prompt. `where` names it in messages ("prompt[2]", "the chat
    prompt"). Raises ValueError with a message a user can act on."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError(f"{where} must not be empty")
        check_prompt_chars(model, prompt, where)
        token_ids = model.tokenizer.encode(prompt)
    else:
        token_ids = list(prompt)
        _check_ids(token_ids, model.vocab_size, where)
    if not token_ids:
        raise ValueError(f"{where} must not be empty")
    text = prompt if isinstance(prompt, str) else None
    params = _fit(len(token_ids), params, model.max_model_len, where)
    if params.logit_bias:
        _check_ids(list(params.logit_bias), model.vocab_size, "logit_bias")
    return PreparedRequest(text, token_ids, params, _compile(model, params))


def max_prompt_chars(model: ModelInfo) -> int | None:
    """The most characters a prompt that fits the context can have; None: no bound known.

    Characters are not a bound on tokens by themselves (one token may stand for many characters),
    so the bound is context x the longest token's text (`max_token_chars`: a byte-level piece
    has a character per byte of text, so it covers at most that many characters; a SentencePiece
    piece covers one per character) x _NORMALIZATION_SHRINK, for normalizers that compose
    characters before the pieces are matched (NFC/NFKC join at most three into one: a Hangul
    L+V+T syllable). A text longer than this cannot fit, whatever the tokenizer does with it,
    so it is refused before the tokenizer spends seconds and memory on it. Tokenizers whose
    normalizer deletes characters (BERT's clean_text) are not decoder models' and are not bound."""
    if model.max_token_chars is None:
        return None
    return model.max_model_len * model.max_token_chars * _NORMALIZATION_SHRINK


def check_prompt_chars(model: ModelInfo, text: str, where: str) -> None:
    """ValueError, before tokenizing, for a text too long to fit the context (max_prompt_chars)."""
    limit = max_prompt_chars(model)
    if limit is not None and len(text) > limit:
        raise ValueError(
            f"{where} has {len(text)} characters: more than any text of the model's context "
            f"length {model.max_model_len} tokens can have (at most {limit} characters for this "
            "tokenizer); shorten the prompt")


def _compile(model: ModelInfo, params: SamplingParams) -> CompiledGrammar | None:
    spec = params.structured_output
    if spec is None:
        return None
    if model.grammars is None:
        raise StructuredOutputError(
            f"{spec.source}: this engine has no structured output (grammar) support", spec.source)
    return model.grammars.compile(spec)


def _check_ids(token_ids: list[int], vocab_size: int, where: str) -> None:
    bad = [t for t in token_ids
           if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{where}: token ids must be integers in [0, {vocab_size}) (the "
                         f"vocabulary); got {bad[0]!r}")


def _fit(num_tokens: int, params: SamplingParams, limit: int, where: str) -> SamplingParams:
    if num_tokens >= limit:
        raise ValueError(f"{where} has {num_tokens} tokens, but the model's context length is "
                         f"{limit}: shorten the prompt")
    if params.max_tokens is None:
        return replace(params, max_tokens=limit - num_tokens)
    if num_tokens + params.max_tokens > limit:
        raise ValueError(
            f"{where} has {num_tokens} tokens and max_tokens is {params.max_tokens}; together "
            f"they exceed the model's context length {limit}: lower max_tokens to at most "
            f"{limit - num_tokens} or shorten the prompt"
        )
    return params
