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
