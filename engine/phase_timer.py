"""Wall time of each start-up phase, logged as one info line so that operators see where a start
went (hashing, header, weights, KV cache, grammar set-up, CUDA graphs), not only its total."""

from __future__ import annotations

import time


class PhaseTimer:
    def __init__(self) -> None:
        self._start = self._last = time.perf_counter()
        self.phases: list[tuple[str, float]] = []

    def lap(self, name: str) -> None:
        """Close the phase that ran since the last lap, under `name`."""
        now = time.perf_counter()
        self.phases.append((name, now - self._last))
        self._last = now

    @property
    def total(self) -> float:
        return self._last - self._start

    def summary(self) -> str:
        """'2.41 s (verify 0.21 s, header 0.10 s, ...)'"""
        parts = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.phases)
        return f"{self.total:.2f} s ({parts})"
