"""CallRecord: one HTTP API call as the gate sees it, shared with the serving layer through a
context variable (set by the gate around the route; asyncio tasks the route starts inherit it).

The serving layer reads it when it submits: the key's name and weight go on the engine request
(the scheduler's fair share), its priority is added, and the streams are kept here so that the
gate can count the call's tokens and finish reason when the response has been sent.
"""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass, field
from typing import Protocol


class CountedStream(Protocol):
    num_prompt_tokens: int
    num_generation_tokens: int
    finish_reason: str | None


@dataclass
class CallRecord:
    key: str | None  # the key's name; None: no keys configured
    weight: float = 1.0
    priority: int = 0
    endpoint: str = ""
    start: float = field(default_factory=time.monotonic)
    model: str | None = None
    streams: list[CountedStream] = field(default_factory=list)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(s.num_prompt_tokens for s in self.streams)

    @property
    def num_completion_tokens(self) -> int:
        return sum(s.num_generation_tokens for s in self.streams)

    @property
    def finish_reason(self) -> str | None:
        reasons = [s.finish_reason for s in self.streams if s.finish_reason]
        return reasons[-1] if reasons else None


current_call: contextvars.ContextVar[CallRecord | None] = contextvars.ContextVar(
    "hearth_call", default=None
)
