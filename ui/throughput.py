"""Prompt and generation throughput over the last minutes, from the engine's cumulative token
counters.

The monitor feeds `record()` with each snapshot it takes (any browser session; samples closer than
`min_interval_s` are skipped, so several open monitors do not add noise). A rate is the counter's
change between two samples over their time apart; with no monitor open there are no samples, and the
next rate is the average over the gap.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

PROMPT = "prompt"
GENERATION = "generation"


@dataclass(frozen=True)
class _Sample:
    time: float  # time.monotonic()
    num_prompt_tokens: int
    num_generation_tokens: int


@dataclass(frozen=True)
class Rate:
    seconds_ago: float  # <= 0: the end of the interval the rate covers, relative to now
    kind: str  # PROMPT or GENERATION
    tokens_per_s: float


class ThroughputHistory:
    def __init__(self, window_s: float = 300.0, min_interval_s: float = 0.5) -> None:
        self.window_s = window_s
        self.min_interval_s = min_interval_s
        self._samples: deque[_Sample] = deque()
        self._lock = threading.Lock()

    def record(self, time: float, num_prompt_tokens: int, num_generation_tokens: int) -> None:
        with self._lock:
            if self._samples and time - self._samples[-1].time < self.min_interval_s:
                return
            self._samples.append(_Sample(time, num_prompt_tokens, num_generation_tokens))
            while self._samples and self._samples[0].time < time - self.window_s:
                self._samples.popleft()

    def rates(self, now: float) -> list[Rate]:
        """Both rates for each interval between consecutive samples, oldest first."""
        with self._lock:
            samples = list(self._samples)
        rates = []
        for before, after in zip(samples[:-1], samples[1:], strict=True):
            elapsed = after.time - before.time
            ago = round(after.time - now, 1)
            prompt = (after.num_prompt_tokens - before.num_prompt_tokens) / elapsed
            generation = (after.num_generation_tokens - before.num_generation_tokens) / elapsed
            rates.append(Rate(ago, PROMPT, max(0.0, prompt)))
            rates.append(Rate(ago, GENERATION, max(0.0, generation)))
        return rates

    def latest(self, kind: str) -> float | None:
        rates = [r for r in self.rates(0.0) if r.kind == kind]
        return rates[-1].tokens_per_s if rates else None
