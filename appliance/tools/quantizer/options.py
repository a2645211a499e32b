"""QuantizeOptions: what `hearth quantize` was asked for, checked (no torch: the CLI imports it)."""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("awq", "gptq", "rtn")


@dataclass(frozen=True)
class QuantizeOptions:
    method: str
    bits: int = 4
    group_size: int = 128
    sym: bool | None = None  # None: the method's default (gptq, rtn: symmetric; awq: zero points)
    num_samples: int = 16
    seq_len: int = 128
    act_order: bool | None = None  # gptq: columns by decreasing Hessian diagonal, static groups
    # (None: on for gptq; held-out perplexity of the default model 27.0 -> 24.1, symmetric)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.bits not in (4, 8) or (self.method == "awq" and self.bits != 4):
            allowed = "4" if self.method == "awq" else "4 or 8"
            raise ValueError(f"{self.method} supports bits {allowed}, got {self.bits}")
        if self.act_order is not None and self.method != "gptq":
            raise ValueError(f"act order is a gptq option, not {self.method}'s")
        if self.group_size < 1 or self.num_samples < 1 or self.seq_len < 2:
            raise ValueError("group_size, num_samples and seq_len must be positive")

    @property
    def symmetric(self) -> bool:
        return self.sym if self.sym is not None else self.method != "awq"

    @property
    def gptq_act_order(self) -> bool:
        return self.method == "gptq" and self.act_order is not False
