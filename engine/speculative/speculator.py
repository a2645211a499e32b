"""Speculator: which running sequences speculate this step, their proposals, and the counters.

The engine calls `propose` before Scheduler.schedule(): each eligible decoding sequence gets
`spec_token_ids`, which the scheduler fits into the token budget and the KV cache (or drops).
After the step, `record` counts what the target accepted, and `clear` removes the proposals so
no later step reuses them.

A step speculates only while at most `disable_by_batch_size` sequences run: above it the batch
already fills the device. A sequence speculates only when its draws need nothing the verifier
does not apply: greedy or temperature / top-k / top-p / min-p, without penalties, logprobs,
logit_bias, grammars or a seed (seeded draws are keyed per output position, which speculation
would change); the others decode one token per step beside it.

With async scheduling a step that has nothing to verify need not be synchronous: n-gram
proposals come in runs (the output copies a stretch of its context, then writes its own), so
the engine overlaps steps while no n-gram matches (`in_sight`), and a step whose `propose`
found nothing runs asynchronously too. Only steps that verify wait for their tokens.
"""

from __future__ import annotations

from hearth.engine.outputs import RunnerOutput, ScheduleOutput
from hearth.engine.scheduler import PLACEHOLDER_TOKEN_ID
from hearth.engine.sequence import Sequence
from hearth.engine.speculative.config import SpeculativeConfig
from hearth.engine.speculative.proposer_ngram import NgramProposer
from hearth.engine.speculative.stats import SpecDecodeCounters, SpecDecodeStats


class Speculator:
    def __init__(self, config: SpeculativeConfig, max_len: int, draft=None) -> None:
        """draft: a DraftProposer for method "draft" (engine/speculative/proposer_draft.py)."""
        self.config = config
        self.max_len = max_len
        self.draft = draft
        self.ngram = NgramProposer(config.num_speculative_tokens, config.prompt_lookup_min,
                                   config.prompt_lookup_max)
        self.counters = SpecDecodeCounters(config.method, config.num_speculative_tokens)
        self._proposed: list[Sequence] = []

    def wants(self, num_running: int) -> bool:
        """Whether this step speculates (the engine then runs it synchronously)."""
        return 0 < num_running <= self.config.disable_by_batch_size

    def in_sight(self, running: list[Sequence]) -> bool:
        """Whether the next step would likely verify a proposal, asked while a step is in flight
        (async scheduling): n-gram proposals are looked up on the tokens already on the host
        (the in-flight token left out), a draft model proposes every step. False lets the
        engine keep overlapping steps; True drains the pipeline so the next step can propose on
        the full context and verify synchronously."""
        if self.draft is not None:
            return True
        for seq in running:
            if _eligible(seq) and self._limit(seq) > 0:
                tokens = seq.token_ids
                if self.ngram.matches(tokens, skip_last=tokens[-1] == PLACEHOLDER_TOKEN_ID):
                    return True
        return False

    @property
    def has_proposals(self) -> bool:
        """Whether the last `propose` gave any sequence tokens to verify."""
        return bool(self._proposed)

    def propose(self, running: list[Sequence]) -> None:
        seqs = [s for s in running if _eligible(s)]
        limits = [self._limit(s) for s in seqs]
        if self.draft is not None:
            proposals = self.draft.propose(seqs, limits)
        else:
            proposals = [self.ngram.propose(s.token_ids, n) for s, n in zip(seqs, limits)]
        for seq, tokens in zip(seqs, proposals, strict=True):
            if tokens:
                seq.spec_token_ids = tokens
                self._proposed.append(seq)

    def _limit(self, seq: Sequence) -> int:
        """Proposals worth verifying: the step adds at most limit + 1 tokens, within max_tokens
        and the context length."""
        room = self.max_len - seq.num_tokens
        max_tokens = seq.sampling_params.max_tokens
        if max_tokens is not None:
            room = min(room, max_tokens - seq.num_output_tokens)
        return max(min(self.config.num_speculative_tokens, room - 1), 0)

    def record(self, schedule: ScheduleOutput, output: RunnerOutput) -> None:
        for chunk in schedule.chunks:
            if chunk.spec_token_ids:
                token_ids = output.sampled_token_ids.get(chunk.seq.seq_id)
                if token_ids:
                    self.counters.record(len(chunk.spec_token_ids), len(token_ids) - 1)

    def clear(self) -> None:
        for seq in self._proposed:
            seq.spec_token_ids = []
        self._proposed = []

    def stats(self) -> SpecDecodeStats:
        return self.counters.snapshot()


def _eligible(seq: Sequence) -> bool:
    p = seq.sampling_params
    return (seq.forked and seq.num_computed_tokens == seq.num_tokens - 1
            and seq.grammar is None and not p.has_penalties and p.logprobs is None
            and not p.logit_bias and (p.seed is None or p.greedy))
