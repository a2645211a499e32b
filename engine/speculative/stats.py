"""SpecDecodeStats: cumulative speculation counters, named after vLLM's metrics (no torch).

    vllm:spec_decode_num_drafts                  sequences-steps that verified a proposal
    vllm:spec_decode_num_draft_tokens            tokens proposed
    vllm:spec_decode_num_accepted_tokens         tokens accepted
    vllm:spec_decode_num_accepted_tokens_per_pos accepted at proposal position 0, 1, ... K-1

acceptance rate = accepted / draft tokens; mean acceptance length = 1 + accepted / drafts.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpecDecodeStats:
    method: str
    num_speculative_tokens: int
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: tuple[int, ...] = ()

    @property
    def acceptance_rate(self) -> float | None:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    @property
    def mean_acceptance_length(self) -> float | None:
        """Tokens each verified proposal yielded, the target's own token included."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else None


class SpecDecodeCounters:
    """The mutable side, on the engine thread; `snapshot()` hands a frozen copy to readers."""

    def __init__(self, method: str, num_speculative_tokens: int) -> None:
        self.method = method
        self.k = num_speculative_tokens
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.accepted_per_pos = [0] * num_speculative_tokens

    def record(self, num_proposed: int, num_accepted: int) -> None:
        """One sequence's verified proposal of `num_proposed` tokens, `num_accepted` kept."""
        if num_proposed == 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_proposed
        self.num_accepted_tokens += num_accepted
        for pos in range(num_accepted):
            self.accepted_per_pos[pos] += 1

    def snapshot(self) -> SpecDecodeStats:
        return SpecDecodeStats(self.method, self.k, self.num_drafts, self.num_draft_tokens,
                               self.num_accepted_tokens, tuple(self.accepted_per_pos))
