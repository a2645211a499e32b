"""Router: which replica serves a request (no torch).

    prompt blocks      [b0][b1][b2][b3][..]     chained hashes, as the block manager keys them
    replica 0 cache     b0  b1  b2               3 blocks: a multi-turn chat's earlier turn
    replica 1 cache     b0                       1 block: the shared system prompt only
    -> replica 0, unless its outstanding work exceeds the least loaded one's by more than
       `max_imbalance_tokens` (then the cache hit is not worth the queue)

Outstanding work is the tokens a replica still owes: prompt tokens plus max_tokens of every
request routed to it and not yet finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class PrefixCache(Protocol):
    def match_prefix(self, seq) -> object: ...  # BlockManager.match_prefix -> PrefixHit | None


@dataclass
class _Probe:
    """What BlockManager.match_prefix reads of a sequence: a prompt not yet scheduled."""

    token_ids: list[int]
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    rope_long: bool = False  # a probe matches the short-regime chain (longrope prompts past the
    # switch start their own chain, so the router merely finds no hit for them)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class RouteDecision:
    replica: int
    cached_tokens: int  # prompt tokens the chosen replica's prefix cache holds
    reason: str  # "prefix" | "load"


class Router:
    def __init__(self, caches: list[PrefixCache], max_imbalance_tokens: int = 16384) -> None:
        if not caches:
            raise ValueError("the router needs at least one replica")
        self.caches = caches
        self.max_imbalance_tokens = max_imbalance_tokens
        self.work = [0] * len(caches)  # outstanding tokens per replica
        self.num_routed = [0] * len(caches)
        self._owner: dict[str, tuple[int, int]] = {}  # request id -> (replica, its work)

    def route(self, request_id: str, token_ids: list[int], max_tokens: int) -> RouteDecision:
        hits = [self._cached_tokens(cache, token_ids) for cache in self.caches]
        least = min(range(len(self.caches)), key=lambda i: (self.work[i], i))
        best = max(range(len(self.caches)), key=lambda i: (hits[i], -self.work[i], -i))
        decision = RouteDecision(least, hits[least], "load")
        if hits[best] > 0 and self.work[best] - self.work[least] <= self.max_imbalance_tokens:
            decision = RouteDecision(best, hits[best], "prefix")
        cost = len(token_ids) + max_tokens
        self._owner[request_id] = (decision.replica, cost)
        self.work[decision.replica] += cost
        self.num_routed[decision.replica] += 1
        return decision

    def replica_of(self, request_id: str) -> int | None:
        owner = self._owner.get(request_id)
        return None if owner is None else owner[0]

    def finish(self, request_id: str) -> None:
        """The request finished or was aborted: its work is no longer outstanding."""
        owner = self._owner.pop(request_id, None)
        if owner is not None:
            self.work[owner[0]] -= owner[1]

    @staticmethod
    def _cached_tokens(cache: PrefixCache, token_ids: list[int]) -> int:
        hit = cache.match_prefix(_Probe(list(token_ids)))
        return 0 if hit is None else hit.num_tokens
