"""SamplingParams: how one request's tokens are chosen and when it stops.

Validation lives here so that every entry point (offline `LLM`, the HTTP API, the UI) rejects the
same
bad values with the same message. Every error names the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hearth.engine.structured_output import StructuredOutput

_MAX_LOGPROBS = 20
_MAX_LOGIT_BIAS = 100.0  # OpenAI's range: -100 bans a token, 100 all but forces it


@dataclass
class SamplingParams:
    """Per-request sampling settings (vLLM-compatible names).

    temperature 0 means greedy. `seed` makes sampling reproducible per request, independent of the
    batch it runs in. `n` parallel samples share the prompt's KV blocks (copy-on-write).
    """

    n: int = 1
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token; 0 = only the chosen token
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    detokenize: bool = True  # False: token ids only, no text (benchmarks; stop strings need text)
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling
    structured_output: StructuredOutput | None = None  # a grammar the output must match

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        _check_int("n", self.n, low=1, high=128)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, low=1)
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        _check_int("top_k", self.top_k, low=0)
        _check_number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        _check_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_number(name, value)
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if self.seed is not None:
            _check_int("seed", self.seed)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids", token_id, low=0)
        if not self.detokenize and self.stop:
            raise ValueError("stop strings need detokenize=True (they are matched in the text)")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0, high=_MAX_LOGPROBS)
        if self.logit_bias:
            _check_logit_bias(self.logit_bias)
        if self.structured_output is not None and not isinstance(
                self.structured_output, StructuredOutput):
            raise ValueError("structured_output must be a StructuredOutput")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


def _check_logit_bias(bias: object) -> None:
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must be a mapping of token id to bias, got {bias!r}")
    for token_id, value in bias.items():
        _check_int("logit_bias token id", token_id, low=0)
        _check_number("logit_bias value", value)
        if not -_MAX_LOGIT_BIAS <= value <= _MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias values must be in [-100, 100], got {value} for token "
                             f"{token_id}")


def _check_int(name: str, value: object, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value != value:  # NaN
        raise ValueError(f"{name} must be a number, got NaN")
