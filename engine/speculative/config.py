"""SpeculativeConfig: how the engine speculates, validated once (no torch).

`LLM(..., speculative=...)` and `hearth serve --speculative ...` both end here. The offline API
takes a SpeculativeConfig, a method name ("ngram", "draft") or a dict of these fields.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

SPECULATIVE_METHODS = ("ngram", "draft")

# K when none is given: verifying K proposals runs K + 1 rows a sequence. On a CPU through the
# int4 GEMV (the server's default there, engine/cpu_precision.py: torch's
# _weight_int4pack_mm_for_cpu and the int8 LM head, in a bf16 model or on bf16 inputs in a
# float32 one) rows go in tiles of 4: 4 rows cost 1.6x one row, 5 rows 3x, so K = 3 (1.60x
# against 1.28x with K = 4 in one run). The native CPU kernels (float32, kernels/cpu_native.py)
# take K = 3 too: their GEMV is compute-bound, a verification row costs nearly a decode row.
# Exact float32 on a CPU (sgemm) and a GPU: K = 4 (float32: 32.5 tok/s against 28.5).
# n-gram proposals on a GPU: a verification costs about one replay whatever its rows, and the step
# (synchronous) weighs more than the rows, so longer proposals pay: K = 8 1.98x, K = 4 1.66x at
# batch 1 on an H100 (the default model, bf16, steps with nothing to verify overlapped; before
# that 1.40x / 1.10-1.15x, and K = 2 1.04x). docs/benchmarks.md has the runs.
DEFAULT_K = 4
DEFAULT_K_CPU_16BIT = 3
DEFAULT_K_CUDA_NGRAM = 8


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    # K: tokens proposed per sequence and step; None: the device's default (`for_device`)
    num_speculative_tokens: int | None = None
    draft_model: str | None = None  # method "draft": catalogue name, HF directory or .gguf path
    prompt_lookup_min: int = 2  # method "ngram": shortest n-gram matched
    prompt_lookup_max: int = 4  # method "ngram": longest n-gram matched (tried first)
    # Above this many running sequences a step does not speculate: the batch already fills the
    # device, and K + 1 rows per sequence cost more than the accepted tokens save.
    disable_by_batch_size: int = 8

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(SPECULATIVE_METHODS)};"
                             f" got {self.method!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
                     "disable_by_batch_size"):
            value = getattr(self, name)
            if value is None and name == "num_speculative_tokens":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"speculative {name} must be a positive integer, got {value!r}")
        if self.num_speculative_tokens is not None and self.num_speculative_tokens > 16:
            raise ValueError("num_speculative_tokens must be <= 16 (acceptance falls with each "
                             f"position); got {self.num_speculative_tokens}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min ({self.prompt_lookup_min}) must be <= "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")
        if self.method == "draft" and not self.draft_model:
            raise ValueError("speculative method 'draft' needs a draft model (--draft-model): a "
                             "small model with the target's tokenizer")
        if self.method == "ngram" and self.draft_model:
            raise ValueError("a draft model was given with speculative method 'ngram'; use "
                             "method 'draft' to speculate with it")

    def for_device(self, device_type: str, float32: bool) -> SpeculativeConfig:
        """This config with K filled in when none was given (DEFAULT_K*, above): the device
        ("cpu", "cuda") and whether the model runs exact float32 (neither the int4 GEMV nor the
        native CPU kernels)."""
        if self.num_speculative_tokens is not None:
            return self
        if device_type == "cpu":
            k = DEFAULT_K if float32 else DEFAULT_K_CPU_16BIT
        else:
            k = DEFAULT_K_CUDA_NGRAM if self.method == "ngram" else DEFAULT_K
        return replace(self, num_speculative_tokens=k)

    @classmethod
    def parse(cls, value: SpeculativeConfig | str | dict | None) -> SpeculativeConfig | None:
        """None, a config, a method name or a dict of fields -> a config (or None: off)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            return cls(method=value)
        if isinstance(value, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"unknown speculative settings {unknown}; known: "
                                 f"{', '.join(sorted(known))}")
            return cls(**value)
        raise ValueError("speculative must be 'ngram', 'draft', a dict of SpeculativeConfig "
                         f"fields or a SpeculativeConfig; got {type(value).__name__}")
