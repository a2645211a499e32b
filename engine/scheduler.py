"""Scheduler: which tokens of which sequences the next forward pass computes (no torch).

Each step it spends a token budget (`max_num_batched_tokens`) on running sequences first (a decode
costs 1 token, an unfinished chunked prefill continues), then admits waiting ones in priority order
(lower number first, FCFS within a priority; across API keys by deficit round robin over tokens,
engine/fair_share.py), taking prefix-cache hits into account. When KV blocks
run out it preempts by recompute: the lowest-priority, latest-arrived running sequence loses its
blocks and returns to the waiting queue with `num_computed_tokens = 0`.

    schedule() -> ScheduleOutput -> runner -> RunnerOutput -> update() -> sampled sequences

`num_computed_tokens` moves in three places: update() advances it by each chunk the runner
computed; schedule() sets it to the prefix-cache hit when it admits a sequence (those tokens' K/V
are already in the cache), and to 0 when it preempts one (its blocks are gone).

Async scheduling (the engine overlaps the next step's CPU work with this step's GPU run) calls
update() with PLACEHOLDER_TOKEN_ID for each sample still on the device, so the next schedule()
sees exact lengths; resolve_token() later puts the real id in its place and applies the stop
rules that depend on its value (the length rules already ran in update()).
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass

from hearth.engine.block_manager import BlockManager, BlockSnapshot
from hearth.engine.config import SchedulerConfig
from hearth.engine.fair_share import FairShare
from hearth.engine.outputs import RunnerOutput, ScheduledChunk, ScheduleOutput
from hearth.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass(frozen=True)
class SeqSnapshot:
    seq_id: int
    request_id: str
    state: str  # "waiting", "prefill" (running, prompt not yet computed) or "decode"
    num_prompt_tokens: int
    num_output_tokens: int
    num_computed_tokens: int
    num_blocks: int
    age_s: float  # since arrival
    constrained: bool = False  # its output must match a grammar (structured output)


@dataclass(frozen=True)
class SchedulerSnapshot:
    """A copy of the queues' state for the monitor UI; safe to hand to another thread."""

    num_running: int
    num_waiting: int
    seqs: tuple[SeqSnapshot, ...]  # running first, then waiting, each in scheduling order
    num_preemptions: int
    blocks: BlockSnapshot


PLACEHOLDER_TOKEN_ID = -1  # a sampled token not read back yet (async scheduling)


def _order(seq: Sequence) -> tuple[int, float, int]:
    return (seq.priority, seq.arrival_time, seq.seq_id)


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, block_manager: BlockManager, eos_token_ids: Iterable[int]
    ) -> None:
        self.config = config
        self.block_manager = block_manager
        self.eos_token_ids = frozenset(eos_token_ids)
        # A sequence longer than the whole cache could never run, even alone: cap it there
        # (a sliding window releases blocks as it goes: only the window and a chunk are held).
        self.max_len = config.max_model_len
        if block_manager.sliding_window is None:
            self.max_len = min(self.max_len, block_manager.num_blocks * block_manager.block_size)
        self.waiting: list[Sequence] = []  # both sorted by _order
        self.running: list[Sequence] = []
        self._finished_seq_ids: list[int] = []  # since the last schedule()
        self._num_preemptions = 0
        self._seq_ids = itertools.count()
        self.fair_share = FairShare()  # admission order across API keys
        self._num_schedules = 0
        self._held_since: int | None = None  # the schedule() that began holding admissions

    def next_seq_id(self) -> int:
        return next(self._seq_ids)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_preemptions(self) -> int:
        return self._num_preemptions

    # -- queue changes from the engine ----------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a sequence. Its length was checked against `max_len` before (engine/prepare.py:
        the engine's context length is this `max_len`)."""
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=_order)

    def abort_request(self, request_id: str) -> list[Sequence]:
        seqs = [s for s in self.running + self.waiting if s.request_id == request_id]
        for seq in seqs:
            self.finish(seq, FinishReason.ABORT)
        return seqs

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.is_finished:
            return
        queue = self.running if seq.status is SequenceStatus.RUNNING else self.waiting
        if seq in queue:  # the engine may end a sequence it has not added yet
            queue.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq)
        self._finished_seq_ids.append(seq.seq_id)

    # -- schedule -------------------------------------------------------------------------------

    def schedule(self) -> ScheduleOutput:
        out = ScheduleOutput(finished_seq_ids=self._finished_seq_ids)
        self._finished_seq_ids = []
        self._num_schedules += 1
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted_seq_ids and not self._hold_admissions(out):
            self._schedule_waiting(out, budget)
        out.block_copies = self.block_manager.take_block_copies()
        return out

    def _schedule_running(self, out: ScheduleOutput, budget: int) -> int:
        # Victims come from the end of `running`, at or after the sequence being scheduled, so a
        # sequence already given a chunk this step is never preempted.
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            if self._passes_rope_switch(seq):
                self._recompute_long(seq)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if num_new <= 0:
                continue  # nothing to compute (its sample never arrived)
            spec = self._spec_tokens(seq, num_new, budget)
            if spec and not self.block_manager.allocate(seq, num_new + len(spec)):
                spec = ()  # no room for the proposals: decode without them, preempt no one
            if spec or self._allocate_or_preempt(seq, num_new, out):
                num_new += len(spec)
                out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_new, spec))
                budget -= num_new
        return budget

    def _spec_tokens(self, seq: Sequence, num_new: int, budget: int) -> tuple[int, ...]:
        """The proposals a decoding sequence verifies this step, within the token budget and
        the context length (engine/speculative/: the engine set them before schedule())."""
        if not seq.spec_token_ids or num_new != 1 or seq.num_computed_tokens != seq.num_tokens - 1:
            return ()
        room = min(budget - 1, self.max_len - seq.num_tokens)
        switch = self.config.rope_switch
        if switch is not None and not seq.rope_long:
            # positions past the switch would be computed with the short factors; the step that
            # passes it recomputes the sequence instead (_recompute_long), with or without proposals
            room = min(room, switch - seq.num_tokens)
        return tuple(seq.spec_token_ids[: max(room, 0)])

    # -- longrope (Phi-3): short factors up to the pretraining context, long ones past it ----------

    def _passes_rope_switch(self, seq: Sequence) -> bool:
        switch = self.config.rope_switch
        return switch is not None and not seq.rope_long and seq.num_tokens > switch

    def _recompute_long(self, seq: Sequence) -> None:
        """`seq` just grew past the longrope switch: its keys were rotated with the short factors
        and every position must now use the long ones, so its blocks go (they stay findable by
        short prompts) and it computes all its tokens again, as transformers' Phi-3 drops its
        cache at that length. It keeps its place in `running`; it is not counted as preempted."""
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.rope_long = True

    def _allocate_or_preempt(self, seq: Sequence, num_new: int, out: ScheduleOutput) -> bool:
        while not self.block_manager.allocate(seq, num_new):
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, out: ScheduleOutput) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self._num_preemptions += 1
        bisect.insort(self.waiting, seq, key=_order)
        out.preempted_seq_ids.append(seq.seq_id)

    def _hold_admissions(self, out: ScheduleOutput) -> bool:
        """Whether the waiting sequences sit this step out (`admission_hold_steps`): only while
        the step so far is all decode rows (admitting would make it a mixed step, run eagerly
        instead of as a CUDA graph), fewer are waiting than would fill an eighth of the batch,
        and for at most `admission_hold_steps` steps in a row. A trickle of arrivals then joins
        in groups, one mixed step per group (TGI's max_waiting_tokens is the same idea). The
        free slots do not end the hold: in a full batch each finished request frees one slot,
        and admitting into every one as it frees is exactly the trickle of mixed steps."""
        hold = self.config.admission_hold_steps
        if (hold == 0 or not self.waiting or not out.chunks
                or len(out.chunks) != out.num_batched_tokens  # a prompt chunk runs already
                or len(self.waiting) >= max(1, self.config.max_num_seqs // 8)):
            self._held_since = None
            return False
        if self._held_since is None:
            self._held_since = self._num_schedules
        if self._num_schedules - self._held_since < hold:
            return True
        self._held_since = None
        return False

    def _schedule_waiting(self, out: ScheduleOutput, budget: int) -> None:
        while self.waiting and budget > 0:
            seq = self.fair_share.pick(self.waiting)
            room = self.config.max_num_seqs - len(self.running)
            if room < min(seq.num_samples_to_draw, self.config.max_num_seqs):
                break  # a parent forks into n running sequences after its first sample
            num_new = self._admit(seq, budget)
            if num_new == 0:
                break  # FCFS: nobody overtakes the first sequence that does not fit
            self.waiting.remove(seq)
            self.fair_share.charge(seq, seq.num_tokens)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=_order)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_new))
            budget -= num_new

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Attach cached prefix blocks and allocate the first chunk; 0 when it does not fit."""
        if self.config.rope_switch is not None:  # the regime its K/V are computed in (and cached)
            seq.rope_long = seq.num_tokens > self.config.rope_switch
        prefix = self.block_manager.match_prefix(seq)
        num_computed = seq.num_computed_tokens if prefix is None else prefix.num_tokens
        num_left = seq.num_tokens - num_computed
        num_new = min(num_left, budget)
        if num_new < num_left and not self.config.enable_chunked_prefill:
            return 0
        if not self.block_manager.allocate(seq, num_new, prefix):
            return 0
        return num_new

    # -- update ---------------------------------------------------------------------------------

    def update(self, schedule: ScheduleOutput, output: RunnerOutput) -> list[Sequence]:
        """Advance computed counters, append sampled tokens, fork n > 1, finish stopped sequences.

        Returns every sequence that received a token this step (forked children included)."""
        sampled: list[Sequence] = []
        for chunk in schedule.chunks:
            seq = chunk.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted or finished between schedule() and update()
            token_ids = output.sampled_token_ids.get(seq.seq_id)
            if chunk.spec_token_ids:
                if token_ids:
                    sampled.append(self._update_speculated(chunk, token_ids))
                continue
            samples = chunk.samples  # read before the token count grows
            num_computed_before = seq.num_computed_tokens
            seq.num_computed_tokens += chunk.num_new_tokens
            self.block_manager.cache_blocks(seq, num_computed_before)
            self.block_manager.drop_out_of_window(seq)
            if samples and token_ids:
                sampled.extend(self._append_samples(seq, token_ids))
        for seq in sampled:
            self.fair_share.charge(seq, 1)
            reason = self._stop_reason(seq)
            if reason is not None:
                self.finish(seq, reason)
        return sampled

    def _update_speculated(self, chunk: ScheduledChunk, token_ids: list[int]) -> Sequence:
        """A verified proposal: append the accepted tokens and the target's own (up to a stop),
        count the accepted positions as computed, and free the blocks that only the rejected
        proposals occupied.

            before  tokens [ .. t41 ]            computed 41    blocks for 41 + 1 + K positions
            after   tokens [ .. t41 d0 d1 x ]    computed 43    blocks for 43 positions"""
        seq = chunk.seq
        num_computed_before = seq.num_computed_tokens
        for token_id in token_ids:
            seq.append_token(token_id)
            if self._stop_reason(seq) is not None:
                break  # the tokens after a stop are not the sequence's
        seq.num_computed_tokens = seq.num_tokens - 1  # the last token's K/V: next step
        self.block_manager.free_tail(seq, seq.num_computed_tokens)
        self.block_manager.cache_blocks(seq, num_computed_before)
        self.block_manager.drop_out_of_window(seq)
        return seq

    def _append_samples(self, seq: Sequence, token_ids: list[int]) -> list[Sequence]:
        seq.append_token(token_ids[0])
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        if seq.forked:
            return [seq]
        seq.forked = True
        children = []
        for index, token_id in enumerate(token_ids[1 : seq.sampling_params.n], start=1):
            child = seq.fork(self.next_seq_id(), index, token_id)
            self.block_manager.fork(seq, child)
            bisect.insort(self.running, child, key=_order)
            children.append(child)
        return [seq, *children]

    def resolve_token(self, seq: Sequence, position: int, token_id: int) -> None:
        """Replace the placeholder at `position` (the sequence's last token) with `token_id`;
        finish the sequence if that token stops it, as update() would have."""
        seq.token_ids[position] = token_id
        if not seq.is_finished:
            reason = self._stop_reason(seq)
            if reason is not None:
                self.finish(seq, reason)
        elif seq.finish_reason is FinishReason.LENGTH and self._stops_on(seq, token_id):
            seq.finish_reason = FinishReason.STOP  # update() checks the token first

    def _stops_on(self, seq: Sequence, token_id: int) -> bool:
        params = seq.sampling_params
        if token_id in params.stop_token_ids:
            return True
        return token_id in self.eos_token_ids and not params.ignore_eos

    def _stop_reason(self, seq: Sequence) -> FinishReason | None:
        params = seq.sampling_params
        if self._stops_on(seq, seq.last_token_id):
            return FinishReason.STOP
        if params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
            return FinishReason.LENGTH
        if seq.num_tokens >= self.max_len:
            return FinishReason.LENGTH
        return None

    # -- monitoring -----------------------------------------------------------------------------

    def snapshot(self) -> SchedulerSnapshot:
        now = time.monotonic()
        seqs = tuple(_seq_snapshot(s, now) for s in [*self.running, *self.waiting])
        return SchedulerSnapshot(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            seqs=seqs,
            num_preemptions=self._num_preemptions,
            blocks=self.block_manager.snapshot(),
        )


def _seq_snapshot(seq: Sequence, now: float) -> SeqSnapshot:
    if seq.status is SequenceStatus.WAITING:
        state = "waiting"
    else:
        state = "prefill" if seq.num_computed_tokens < seq.num_prompt_tokens else "decode"
    return SeqSnapshot(
        seq_id=seq.seq_id,
        request_id=seq.request_id,
        state=state,
        num_prompt_tokens=seq.num_prompt_tokens,
        num_output_tokens=seq.num_output_tokens,
        num_computed_tokens=seq.num_computed_tokens,
        num_blocks=len(seq.live_block_ids),
        age_s=now - seq.arrival_time,
        constrained=seq.sampling_params.structured_output is not None,
    )
