"""Per-key quotas: requests and tokens per minute (sliding 60-second window) and concurrent
requests. Over a limit the request gets 429 with `Retry-After`, the seconds until it would pass.

Tokens (prompt + completion) are known only when a request ends, so the token quota refuses the
next request once the last minute's tokens reached the limit: a key may overrun by one request.
Event-loop thread only (the gate calls it), so no locks.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from hearth.appliance.auth.keys import KeyEntry
from hearth.appliance.protocol import APIError

WINDOW_S = 60.0


class QuotaExceededError(APIError):
    def __init__(self, key: str, what: str, retry_after_s: int) -> None:
        super().__init__(
            429, f"API key {key!r}: {what}; retry in {retry_after_s} s",
            type="rate_limit_error", code="rate_limit_exceeded",
            headers={"Retry-After": str(retry_after_s)},
        )
        self.reason = what.split(" ", 1)[0]


@dataclass
class _Usage:
    requests: deque[float] = field(default_factory=deque)  # start times
    tokens: deque[tuple[float, int]] = field(default_factory=deque)  # (end time, tokens)
    num_tokens: int = 0  # sum over `tokens`
    num_running: int = 0


class Quotas:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._usage: dict[str, _Usage] = {}

    def acquire(self, entry: KeyEntry) -> None:
        """Count one request starting for `entry`, or raise QuotaExceededError."""
        now = self._clock()
        usage = self._trimmed(entry.name, now)
        if entry.max_concurrent is not None and usage.num_running >= entry.max_concurrent:
            raise QuotaExceededError(entry.name, f"concurrency limit: {entry.max_concurrent} "
                                     "requests already running", 1)
        if entry.requests_per_minute is not None and (
                len(usage.requests) >= entry.requests_per_minute):
            wait = usage.requests[0] + WINDOW_S - now
            raise QuotaExceededError(entry.name, f"requests quota: {entry.requests_per_minute} "
                                     "per minute", _seconds(wait))
        if entry.tokens_per_minute is not None and usage.num_tokens >= entry.tokens_per_minute:
            raise QuotaExceededError(entry.name, f"tokens quota: {entry.tokens_per_minute} "
                                     "per minute", _seconds(self._token_wait(entry, usage, now)))
        usage.requests.append(now)
        usage.num_running += 1

    def release(self, entry: KeyEntry, num_tokens: int) -> None:
        """The request `acquire` counted has ended, after `num_tokens` prompt + output tokens."""
        usage = self._usage.setdefault(entry.name, _Usage())
        usage.num_running = max(0, usage.num_running - 1)
        if num_tokens:
            usage.tokens.append((self._clock(), num_tokens))
            usage.num_tokens += num_tokens

    def running(self) -> dict[str, int]:
        return {name: usage.num_running for name, usage in self._usage.items()}

    def _trimmed(self, name: str, now: float) -> _Usage:
        usage = self._usage.setdefault(name, _Usage())
        while usage.requests and usage.requests[0] <= now - WINDOW_S:
            usage.requests.popleft()
        while usage.tokens and usage.tokens[0][0] <= now - WINDOW_S:
            usage.num_tokens -= usage.tokens.popleft()[1]
        return usage

    @staticmethod
    def _token_wait(entry: KeyEntry, usage: _Usage, now: float) -> float:
        """Seconds until enough of the window's tokens expire to be under the quota."""
        excess = usage.num_tokens - entry.tokens_per_minute + 1
        for end, tokens in usage.tokens:
            excess -= tokens
            if excess <= 0:
                return end + WINDOW_S - now
        return WINDOW_S


def _seconds(wait: float) -> int:
    return min(int(WINDOW_S), max(1, math.ceil(wait)))
