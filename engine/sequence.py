"""Sequence: one stream of tokens being generated, and its place in the paged KV cache.

The accounting rule: `num_computed_tokens` (tokens whose K/V sit in the cache) catches up with
`num_tokens` (prompt + generated). A prefill chunk, a prefix-cache hit and a preemption (reset to 0,
recompute) are all moves of that one counter. Plain Python: the scheduler imports no torch.

    token_ids:   [ p0 p1 p2 p3 p4 p5 | o0 o1 ]      num_prompt_tokens = 6, num_tokens = 8
    computed:    [ ######## ]                       num_computed_tokens = 4 (chunked prefill)
    block_ids:   [ 7 | 2 ]                          block_size = 4: block 7 holds tokens 0..3
"""

from __future__ import annotations

import time
from enum import Enum

from hearth.engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context length
    ABORT = "abort"  # client gone, Stop button, error


class Sequence:
    """Token ids, progress counter, block table and status of one sample of one request."""

    def __init__(
        self,
        seq_id: int,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        priority: int = 0,
        sample_index: int = 0,
        arrival_time: float | None = None,
    ) -> None:
        self.seq_id = seq_id
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.sampling_params = sampling_params
        self.priority = priority
        self.sample_index = sample_index  # which of the request's n samples (seeds, output index)
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at admission
        self.block_ids: list[int] = []
        # Leading table entries released by a sliding window (engine/block_manager.py): stale,
        # kept so positions keep their index, never read.
        self.num_dropped_blocks = 0
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.num_preemptions = 0
        self.forked = sampling_params.n == 1  # a parent with n > 1 forks after its first sample
        self.first_token_time: float | None = None
        self.grammar = None  # a CompiledGrammar (engine/grammar.py) its tokens must match, or None
        # Proposed next tokens (speculative decoding) for the next schedule(); not yet its tokens.
        self.spec_token_ids: list[int] = []
        # longrope (Phi-3): its K/V rotate with the long factors, as it is longer than the
        # pretraining context (set by the scheduler: RopeConfig.regime_switch)
        self.rope_long = False
        self.share_key: str | None = None  # its API key's name: the fair-share flow (fair_share.py)
        self.share_weight = 1.0  # that key's weight in the fair share

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def live_block_ids(self) -> list[int]:
        """The blocks this sequence holds (without the ones a sliding window released)."""
        return self.block_ids[self.num_dropped_blocks :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def num_samples_to_draw(self) -> int:
        """Tokens the next sample step must draw: n for a parent that has not forked, else 1."""
        return 1 if self.forked else self.sampling_params.n

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def fork(self, seq_id: int, sample_index: int, token_id: int) -> Sequence:
        """A sibling that replaces this sequence's last sampled token with `token_id`.

        Called right after the parent appended its own first sample, so parent and child differ
        only in that last token, whose K/V nobody has computed yet. The caller shares the block
        table through the block manager (reference counts, copy-on-write)."""
        child = Sequence(
            seq_id,
            self.request_id,
            self.prompt_token_ids,
            self.sampling_params,
            self.priority,
            sample_index,
            self.arrival_time,
        )
        child.token_ids = self.token_ids[:-1] + [token_id]
        child.num_computed_tokens = self.num_computed_tokens
        child.num_cached_tokens = self.num_cached_tokens
        child.status = self.status
        child.forked = True
        child.first_token_time = self.first_token_time
        child.grammar = self.grammar
        child.rope_long = self.rope_long
        child.share_key, child.share_weight = self.share_key, self.share_weight
        return child

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, req={self.request_id!r}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_ids}, {self.status.value})"
        )
