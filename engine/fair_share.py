"""FairShare: which waiting sequence the scheduler admits next, by deficit round robin across
keys (no torch).

Each API key is one flow; unkeyed requests form one flow of their own (key None). A flow's cost
is its tokens: the whole sequence (prompt and anything generated so far) when it is admitted,
then one per generated token. Flows take turns in a ring; a flow whose turn comes gets
`quantum * weight` tokens of credit, and its oldest waiting sequence is admitted once the credit
covers that sequence's length. Credit spent on generation can go below zero, so a key whose
answers are long waits longer for its next admission: over time each busy key gets a share of
the computed tokens in proportion to its weight, and one client sending 200 requests cannot
starve another sending 2.

    ring:     [ None | "kiosk" | "batch" ]      turn ──► "kiosk"
    deficit:  [  -40 |   +310  |   -900  ]      kiosk's head costs 250 ≤ 310: admit it

Priority (lower first) still comes before fairness: only the flows that have a sequence at the
best waiting priority take part. Within a flow, order is first come, first served. With one flow
(no keys) the order is exactly the scheduler's FCFS-by-priority.
"""

from __future__ import annotations

from typing import Protocol

DEFAULT_QUANTUM = 16  # tokens of credit per turn at weight 1: small, so turns interleave finely


class Flowing(Protocol):
    """What FairShare reads of a waiting sequence (engine Sequence, or a test's stand-in)."""

    share_key: str | None
    share_weight: float
    priority: int
    arrival_time: float

    @property
    def num_tokens(self) -> int: ...


class FairShare:
    """Deficit round robin over the flows of the waiting sequences. The scheduler calls
    `pick(waiting)` for the next candidate, `charge(seq, n)` when it admits one (n = its
    tokens) and for each token generated."""

    def __init__(self, quantum: int = DEFAULT_QUANTUM) -> None:
        if quantum < 1:
            raise ValueError(f"fair-share quantum must be >= 1 token, got {quantum}")
        self.quantum = quantum
        self._ring: list[str | None] = []
        self._turn = 0  # index into _ring of the flow whose turn it is
        self._deficit: dict[str | None, float] = {}
        self._served: dict[str | None, int] = {}  # tokens charged per flow, for the monitor

    def pick(self, waiting: list[Flowing]) -> Flowing | None:
        """The sequence to admit next (None when nothing waits). Pure until `charge`: calling it
        again without admitting returns the same sequence."""
        heads = _heads(waiting)
        if not heads:
            return None
        for key in heads:
            if key not in self._deficit:
                self._ring.append(key)
                self._deficit[key] = 0.0
        if len(heads) == 1:
            return next(iter(heads.values()))
        return self._next_affordable(heads)

    def _next_affordable(self, heads: dict[str | None, Flowing]) -> Flowing:
        # Whole rounds at once when nobody can pay: the flow that can afford its head soonest.
        rounds = min(
            max(0.0, (heads[k].num_tokens - self._deficit[k]) / self._credit(heads[k]))
            for k in heads
        )
        whole = int(rounds) - 1 if rounds >= 2 else 0
        for key, head in heads.items():
            self._deficit[key] += whole * self._credit(head)
        while True:
            key = self._ring[self._turn]
            head = heads.get(key)
            if head is not None:
                if self._deficit[key] >= head.num_tokens:
                    return head
                self._deficit[key] += self._credit(head)
            elif self._deficit[key] > 0:
                self._deficit[key] = 0.0  # an idle flow keeps its debt, never its credit
            self._turn = (self._turn + 1) % len(self._ring)

    def _credit(self, head: Flowing) -> float:
        return self.quantum * head.share_weight

    def charge(self, seq: Flowing, num_tokens: int) -> None:
        """`num_tokens` computed for `seq`'s flow: its length at admission, then each token."""
        key = seq.share_key
        if key not in self._deficit:
            self._ring.append(key)
            self._deficit[key] = 0.0
        self._deficit[key] -= num_tokens
        self._served[key] = self._served.get(key, 0) + num_tokens

    def served_tokens(self) -> dict[str | None, int]:
        """Tokens charged to each flow since the start (prompt at admission + generated)."""
        return dict(self._served)


def _heads(waiting: list[Flowing]) -> dict[str | None, Flowing]:
    """The oldest sequence of each flow at the best (lowest) waiting priority."""
    if not waiting:
        return {}
    best = min(seq.priority for seq in waiting)
    heads: dict[str | None, Flowing] = {}
    for seq in waiting:
        if seq.priority != best:
            continue
        head = heads.get(seq.share_key)
        if head is None or seq.arrival_time < head.arrival_time:
            heads[seq.share_key] = seq
    return heads
