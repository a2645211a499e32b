"""Speculative decoding in the scheduler and block manager (no torch): proposals within the token
budget, K/V rollback that frees exactly the rejected blocks, preemption, stops inside a proposal.

A fake verifying runner writes every computed position (proposals included) into a fake KV cache
and reads each sequence's positions back before sampling; its target is a fixed function of the
prefix, and it accepts a proposal while it equals that function. A speculated run must produce the
same tokens as a plain one, whatever is proposed.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from hearth.engine.block_manager import BlockManager
from hearth.engine.config import SchedulerConfig
from hearth.engine.outputs import RunnerOutput, ScheduleOutput
from hearth.engine.sampling_params import SamplingParams
from hearth.engine.scheduler import Scheduler
from hearth.engine.sequence import Sequence
from hearth.engine.speculative.proposer_ngram import NgramProposer

EOS = 2


def target(prefix: list[int]) -> int:
    """The fake model's greedy next token: copies with period 7 after a short prompt."""
    return prefix[-7] if len(prefix) >= 7 else 10 + len(prefix)


class VerifyingRunner:
    def __init__(self, block_size: int) -> None:
        self.bs = block_size
        self.slots: dict[int, list] = {}

    def __call__(self, schedule: ScheduleOutput) -> RunnerOutput:
        out = {}
        for chunk in schedule.chunks:
            seq, tokens = chunk.seq, chunk.token_ids
            context = seq.token_ids[: chunk.start_pos] + tokens
            for pos in range(chunk.start_pos, chunk.end_pos):
                block = self.slots.setdefault(seq.block_ids[pos // self.bs], [None] * self.bs)
                block[pos % self.bs] = tuple(context[: pos + 1])
            if not chunk.samples:
                continue
            for pos in range(chunk.start_pos):  # the cache holds this sequence's prefix
                slot = self.slots[seq.block_ids[pos // self.bs]][pos % self.bs]
                assert slot == tuple(seq.token_ids[: pos + 1]), (seq, pos)
            out[seq.seq_id] = self._verify(context, chunk.end_pos - len(chunk.spec_token_ids))
        return RunnerOutput(out)

    def _verify(self, context: list[int], num_real: int) -> list[int]:
        accepted = []
        for pos in range(num_real, len(context)):
            want = target(context[:pos])
            if context[pos] != want:
                return accepted + [want]
            accepted.append(want)
        return accepted + [target(context)]


def make(num_blocks=64, block_size=4, **config) -> Scheduler:
    return Scheduler(SchedulerConfig(block_size=block_size, **config),
                     BlockManager(num_blocks, block_size), eos_token_ids=[EOS])


def add(sched: Scheduler, prompt: list[int], **params) -> Sequence:
    seq_id = sched.next_seq_id()
    seq = Sequence(seq_id, f"r{seq_id}", prompt, SamplingParams(temperature=0, **params))
    sched.add(seq)
    return seq


def run(sched: Scheduler, propose, max_steps=500) -> list[ScheduleOutput]:
    runner, schedules = VerifyingRunner(sched.block_manager.block_size), []
    while sched.has_unfinished:
        assert len(schedules) < max_steps
        for seq in sched.running:
            if seq.num_computed_tokens == seq.num_tokens - 1:
                seq.spec_token_ids = propose(seq)
        schedule = sched.schedule()
        for seq in sched.running + sched.waiting:
            seq.spec_token_ids = []
        assert schedule.num_batched_tokens <= sched.config.max_num_batched_tokens
        sched.update(schedule, runner(schedule))
        for seq in sched.running:  # exactly the blocks a plain decode would hold
            bs = sched.block_manager.block_size
            assert len(seq.block_ids) == -(-seq.num_computed_tokens // bs), seq
        schedules.append(schedule)
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
    return schedules


def plain_output(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(target(tokens))
    return tokens[len(prompt):]


PROMPT = [3, 4, 5, 6, 7, 8, 9, 30, 31]


def test_ngram_proposals_are_accepted_and_output_is_unchanged():
    sched = make()
    seq = add(sched, PROMPT, max_tokens=30)
    ngram = NgramProposer(4, 1, 3)
    schedules = run(sched, lambda s: ngram.propose(s.token_ids))
    assert seq.output_token_ids == plain_output(PROMPT, 30)
    assert len(schedules) < 15  # ~4 tokens a step once the period repeats, not 30 steps


def _reference_proposal(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """The n-gram lookup by its definition: for n from max_n down, every earlier window of n
    tokens that has a token after it, compared with the last n; the latest match wins."""
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == tokens[-n:]:
                return tokens[start + n : start + n + k]
    return []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=60), st.integers(1, 4), st.integers(0, 4),
       st.integers(1, 6), st.booleans())
def test_ngram_lookup_matches_its_definition(tokens, min_n, extra, k, skip_last):
    """The vectorised lookup (candidates where the last token recurs, extended backwards) gives
    the definition's proposal; `matches` says whether there is one (on the tokens less the last
    with skip_last, as while a step is in flight)."""
    max_n = min_n + extra
    ngram = NgramProposer(k, min_n, max_n)
    expected = _reference_proposal(tokens, k, min_n, max_n) if len(tokens) > min_n else []
    assert ngram.propose(tokens) == expected
    seen = tokens[:-1] if skip_last and tokens else tokens
    wanted = _reference_proposal(seen, k, min_n, max_n) if len(seen) > min_n else []
    assert ngram.matches(tokens, skip_last=skip_last) == bool(wanted)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(0, 40), max_size=5), min_size=1, max_size=20),
       st.integers(1, 30))
def test_any_proposals_give_the_plain_output(proposals, max_tokens):
    """Wrong, right or partly right proposals: the output is the plain decode's, and every step's
    blocks equal a plain decode's (run() checks it: rejected blocks are all freed)."""
    sched = make(num_blocks=32)
    seq = add(sched, PROMPT, max_tokens=max_tokens)
    steps = iter(proposals * 40)
    run(sched, lambda s: next(steps, []))
    assert seq.output_token_ids == plain_output(PROMPT, max_tokens)


def test_rollback_frees_exactly_the_rejected_blocks():
    sched = make(block_size=4)
    bm = sched.block_manager
    seq = add(sched, PROMPT[:7], max_tokens=20)  # 7 tokens; the target continues 3 4 5 ...
    runner = VerifyingRunner(4)
    schedule = sched.schedule()
    sched.update(schedule, runner(schedule))  # prefill: 8 tokens, 7 computed, 2 blocks
    assert (seq.num_tokens, seq.num_computed_tokens, len(seq.block_ids)) == (8, 7, 2)
    seq.spec_token_ids = [4, 5, 99, 99, 99, 99, 99]  # two right, then wrong
    free_before = bm.num_free_blocks
    schedule = sched.schedule()
    chunk = schedule.chunks[0]
    assert chunk.num_new_tokens == 8 and chunk.spec_token_ids == (4, 5, 99, 99, 99, 99, 99)
    assert len(seq.block_ids) == 4  # positions 7..14 need blocks 1, 2, 3
    spec_blocks = seq.block_ids[2:]
    assert bm.num_free_blocks == free_before - 2
    sched.update(schedule, runner(schedule))
    # accepted 4, 5 and the target's 6: 11 tokens, 10 computed -> 3 blocks; block 3 held only
    # rejected proposals and is free again
    assert seq.output_token_ids == [3, 4, 5, 6]
    assert (seq.num_tokens, seq.num_computed_tokens) == (11, 10)
    assert seq.block_ids[:3] == [*seq.block_ids[:2], spec_blocks[0]]
    assert len(seq.block_ids) == 3 and bm.is_free(spec_blocks[1])
    assert bm.num_free_blocks == free_before - 1


def test_proposals_fit_the_token_budget():
    sched = make(max_num_batched_tokens=6)
    a, b = add(sched, PROMPT[:3], max_tokens=10), add(sched, PROMPT[:2], max_tokens=10)
    runner = VerifyingRunner(4)
    schedule = sched.schedule()
    sched.update(schedule, runner(schedule))
    a.spec_token_ids, b.spec_token_ids = [1, 1, 1, 1], [1, 1, 1, 1]
    schedule = sched.schedule()
    assert [(c.seq, len(c.spec_token_ids)) for c in schedule.chunks] == [(a, 4), (b, 0)]
    assert schedule.num_batched_tokens == 6


def test_no_room_for_proposals_decodes_without_them_and_preempts_no_one():
    sched = make(num_blocks=4, block_size=4)
    a, b = add(sched, PROMPT[:7], max_tokens=8), add(sched, PROMPT[:7], max_tokens=8)
    runner = VerifyingRunner(4)
    schedule = sched.schedule()
    sched.update(schedule, runner(schedule))
    assert sched.block_manager.num_free_blocks == 0
    a.spec_token_ids = [3, 4, 5, 6]
    schedule = sched.schedule()
    assert [c.spec_token_ids for c in schedule.chunks] == [(), ()]
    assert not schedule.preempted_seq_ids or schedule.preempted_seq_ids == [b.seq_id]


def test_preemption_with_speculation_recomputes_to_the_same_output():
    sched = make(num_blocks=9, block_size=4, max_num_batched_tokens=64)
    seqs = [add(sched, PROMPT[: 5 + i], max_tokens=14) for i in range(3)]
    ngram = NgramProposer(3, 1, 3)
    run(sched, lambda s: ngram.propose(s.token_ids))
    assert sched.num_preemptions > 0
    for seq in seqs:
        assert seq.output_token_ids == plain_output(seq.prompt_token_ids, 14)


def test_stop_inside_a_proposal_keeps_nothing_after_it():
    sched = make()
    seq = add(sched, PROMPT[:7], max_tokens=20, stop_token_ids=[5])
    run(sched, lambda s: [3, 4, 5, 6, 7])
    assert seq.output_token_ids == [3, 4, 5] and seq.finish_reason.value == "stop"


def test_max_tokens_inside_a_proposal():
    sched = make()
    seq = add(sched, PROMPT[:7], max_tokens=2)
    run(sched, lambda s: [3, 4, 5, 6, 7])
    assert seq.output_token_ids == [3, 4] and seq.finish_reason.value == "length"


def test_ngram_proposer_uses_the_latest_longest_match():
    ngram = NgramProposer(3, 1, 3)
    assert ngram.propose([1, 2, 3, 9, 9, 1, 2, 3, 7, 1, 2, 3]) == [7, 1, 2]
    assert ngram.propose([5, 6, 7, 8]) == []
    assert ngram.propose([1, 2, 1, 2], max_tokens=1) == [1]
    assert ngram.propose([4, 4, 4, 4]) == [4]  # the latest match continues with one token


def _decoding(token_ids: list[int], **params) -> Sequence:
    """A sequence whose prompt is computed and whose next step decodes its last token."""
    seq = Sequence(1, "r", token_ids, SamplingParams(temperature=0, **params))
    seq.num_computed_tokens = len(token_ids) - 1
    return seq


def test_in_sight_looks_at_the_host_tokens_and_respects_the_limits():
    """`in_sight` (asked while a step is in flight): an n-gram match on the tokens the host has,
    the trailing placeholder left out; nothing when max_tokens leaves no room; a draft model
    always proposes."""
    from hearth.engine.scheduler import PLACEHOLDER_TOKEN_ID
    from hearth.engine.speculative import SpeculativeConfig
    from hearth.engine.speculative.speculator import Speculator

    spec = Speculator(SpeculativeConfig(num_speculative_tokens=3), max_len=512)
    copying = [5, 6, 7, 8, 9, 5, 6, 7]  # "6 7" recurs: a proposal of "8 9 5"
    assert spec.in_sight([_decoding(copying)])
    # the in-flight token is unknown: "7 <placeholder>" must not be looked up as "7 7"
    assert spec.in_sight([_decoding(copying + [PLACEHOLDER_TOKEN_ID])])
    assert not spec.in_sight([_decoding([5, 6, 7, 8, 9, PLACEHOLDER_TOKEN_ID])])
    assert not spec.in_sight([_decoding([1, 2, 3, 4])])
    # max_tokens reached: no room to verify anything
    done = _decoding(copying, max_tokens=1)
    done.num_prompt_tokens = len(copying) - 1
    assert not spec.in_sight([done])
    assert Speculator(SpeculativeConfig(num_speculative_tokens=3), 512, draft=object()).in_sight([])
