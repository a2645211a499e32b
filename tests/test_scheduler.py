"""Scheduler on CPU with a fake runner: batching, budget, chunks, preemption, priority, abort, n>1.

The fake runner keeps a fake KV cache (each written slot holds the token prefix up to its position)
and, before sampling a sequence, reads back every position through the block table: a scheduling or
copy-on-write mistake shows up as a wrong slot. Its next token is a function of all earlier tokens,
so a preempted-and-recomputed sequence must produce exactly the tokens of an unpressured run.
"""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from hearth.engine.block_manager import BlockManager
from hearth.engine.config import SchedulerConfig
from hearth.engine.outputs import RunnerOutput, ScheduleOutput
from hearth.engine.sampling_params import SamplingParams
from hearth.engine.scheduler import Scheduler
from hearth.engine.sequence import FinishReason, Sequence, SequenceStatus

EOS = 2


def next_token(token_ids: list[int]) -> int:
    return 100 + sum(t * (i + 1) for i, t in enumerate(token_ids)) % 97


class FakeRunner:
    def __init__(self, block_size: int, token_fn: Callable[[Sequence], int] | None = None):
        self.block_size = block_size
        self.token_fn = token_fn or (lambda seq: next_token(seq.token_ids))
        self.slots: dict[int, list] = {}

    def __call__(self, schedule: ScheduleOutput) -> RunnerOutput:
        for copy in schedule.block_copies:
            self.slots[copy.dst] = list(self.slots[copy.src])
        sampled = {}
        for chunk in schedule.chunks:
            seq = chunk.seq
            assert chunk.start_pos == seq.num_computed_tokens
            for pos in range(chunk.start_pos, chunk.end_pos):
                block = self.slots.setdefault(seq.block_ids[pos // self.block_size], [None] * 64)
                block[pos % self.block_size] = tuple(seq.token_ids[: pos + 1])
            if chunk.samples:
                self._check_kv(seq)
                first = self.token_fn(seq)
                sampled[seq.seq_id] = [first + i for i in range(seq.num_samples_to_draw)]
        return RunnerOutput(sampled_token_ids=sampled)

    def _check_kv(self, seq: Sequence) -> None:
        for pos in range(seq.num_tokens):
            slot = self.slots[seq.block_ids[pos // self.block_size]][pos % self.block_size]
            assert slot == tuple(seq.token_ids[: pos + 1]), (seq, pos)


def make_scheduler(num_blocks: int = 64, block_size: int = 4, **config) -> Scheduler:
    config = SchedulerConfig(block_size=block_size, **config)
    return Scheduler(config, BlockManager(num_blocks, block_size), eos_token_ids=[EOS])


def add(
    sched: Scheduler, prompt: list[int], priority: int = 0, arrival: float | None = None, **params
) -> Sequence:
    seq_id = sched.next_seq_id()
    params.setdefault("max_tokens", 4)
    seq = Sequence(
        seq_id, f"r{seq_id}", prompt, SamplingParams(**params), priority, arrival_time=arrival
    )
    sched.add(seq)
    return seq


def step(sched: Scheduler, runner: FakeRunner) -> tuple[ScheduleOutput, list[Sequence]]:
    schedule = sched.schedule()
    assert schedule.num_batched_tokens <= sched.config.max_num_batched_tokens
    assert sched.num_running <= sched.config.max_num_seqs
    return schedule, sched.update(schedule, runner(schedule))


def run_all(sched: Scheduler, runner: FakeRunner, max_steps: int = 2000) -> list[ScheduleOutput]:
    schedules = []
    while sched.has_unfinished:
        assert len(schedules) < max_steps, "no progress"
        schedules.append(step(sched, runner)[0])
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
    return schedules


def prompt(length: int, start: int = 10) -> list[int]:
    return [start + i % 50 for i in range(length)]


def test_new_requests_join_while_others_decode():
    sched = make_scheduler()
    runner = FakeRunner(4)
    first = add(sched, prompt(6), max_tokens=6)
    step(sched, runner)
    step(sched, runner)
    second = add(sched, prompt(5, start=30), max_tokens=3)
    schedule, sampled = step(sched, runner)
    assert [(c.seq, c.num_new_tokens) for c in schedule.chunks] == [(first, 1), (second, 5)]
    assert sampled == [first, second] and second.first_token_time is not None
    run_all(sched, runner)
    assert first.num_output_tokens == 6 and second.num_output_tokens == 3


def test_long_prompt_is_prefilled_in_budget_sized_chunks():
    sched = make_scheduler(max_num_batched_tokens=16)
    runner = FakeRunner(4)
    seq = add(sched, prompt(40), max_tokens=2)
    chunks = []
    while sched.has_unfinished:
        schedule = sched.schedule()
        chunks += [(c.start_pos, c.num_new_tokens, c.samples) for c in schedule.chunks]
        sched.update(schedule, runner(schedule))
    assert chunks == [(0, 16, False), (16, 16, False), (32, 8, True), (40, 1, True)]
    assert seq.finish_reason is FinishReason.LENGTH


def test_without_chunking_a_prompt_waits_for_room_in_the_budget():
    sched = make_scheduler(max_num_batched_tokens=16, enable_chunked_prefill=False)
    runner = FakeRunner(4)
    first, second = add(sched, prompt(10)), add(sched, prompt(10, start=20))
    schedule, _ = step(sched, runner)
    assert [c.seq for c in schedule.chunks] == [first]
    schedule, _ = step(sched, runner)
    assert [(c.seq, c.num_new_tokens) for c in schedule.chunks] == [(first, 1), (second, 10)]


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=8),
    budget=st.integers(8, 40),
    max_num_seqs=st.integers(1, 5),
)
def test_budget_and_seq_limit_hold_in_every_step(lengths, budget, max_num_seqs):
    sched = make_scheduler(max_num_batched_tokens=budget, max_num_seqs=max_num_seqs)
    seqs = [add(sched, prompt(n, start=n), max_tokens=3) for n in lengths]
    run_all(sched, FakeRunner(4))  # step() checks the budget and the seq limit
    assert all(s.finish_reason is FinishReason.LENGTH and s.num_output_tokens == 3 for s in seqs)


def _outputs(num_blocks: int, lengths: list[int], max_tokens: int) -> tuple[list, Scheduler]:
    sched = make_scheduler(num_blocks=num_blocks, max_num_batched_tokens=24)
    seqs = [
        add(sched, prompt(n, start=7 * i), max_tokens=max_tokens) for i, n in enumerate(lengths)
    ]
    schedules = run_all(sched, FakeRunner(4))
    preempted = {i for s in schedules for i in s.preempted_seq_ids}
    assert preempted == {s.seq_id for s in seqs if s.num_preemptions}
    return [s.output_token_ids for s in seqs], sched


def test_preempted_requests_finish_with_the_same_tokens():
    lengths = [5, 7, 3, 9]
    roomy, _ = _outputs(num_blocks=100, lengths=lengths, max_tokens=10)
    pressed, sched = _outputs(num_blocks=6, lengths=lengths, max_tokens=10)
    assert sched.num_preemptions > 0
    assert pressed == roomy


@settings(max_examples=20, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=5), num_blocks=st.integers(6, 12))
def test_preemption_never_changes_tokens(lengths, num_blocks):
    assert _outputs(num_blocks, lengths, 8)[0] == _outputs(200, lengths, 8)[0]


def test_lower_priority_number_runs_first_and_fcfs_within_a_priority():
    sched = make_scheduler(max_num_seqs=1)
    low = add(sched, prompt(3), priority=1, arrival=0.0, max_tokens=2)
    high_first = add(sched, prompt(3), priority=0, arrival=1.0, max_tokens=2)
    high_second = add(sched, prompt(3), priority=0, arrival=2.0, max_tokens=2)
    order = []
    for schedule in run_all(sched, FakeRunner(4)):
        order += [c.seq for c in schedule.chunks if c.seq not in order]
    assert order == [high_first, high_second, low]


def test_block_pressure_preempts_the_lowest_priority():
    sched = make_scheduler(num_blocks=4)
    runner = FakeRunner(4)
    low = add(sched, prompt(4), priority=1, max_tokens=8)
    step(sched, runner)
    high = add(sched, prompt(8, start=30), priority=0, max_tokens=8)
    step(sched, runner)  # low decodes into its 2nd block, high takes the other 2
    schedule, _ = step(sched, runner)  # high needs a 3rd block
    assert schedule.preempted_seq_ids == [low.seq_id] and low.num_preemptions == 1
    assert [c.seq for c in schedule.chunks] == [high] and low.status is SequenceStatus.WAITING
    run_all(sched, runner)
    assert high.num_output_tokens == low.num_output_tokens == 8


def test_no_admission_in_a_step_that_preempted():
    sched = make_scheduler(num_blocks=4, max_num_seqs=2)
    runner = FakeRunner(4)
    first = add(sched, prompt(8), priority=0, max_tokens=4)
    second = add(sched, prompt(3, start=30), priority=1, max_tokens=4)
    step(sched, runner)
    waiting = add(sched, [40], priority=0, max_tokens=4)
    step(sched, runner)  # first takes the last free block
    schedule, _ = step(sched, runner)  # second needs one: it preempts itself
    assert schedule.preempted_seq_ids == [second.seq_id]
    assert [c.seq for c in schedule.chunks] == [first]  # waiting would fit, but must wait
    schedule, _ = step(sched, runner)
    assert [c.seq for c in schedule.chunks] == [first, waiting]
    run_all(sched, runner)
    assert first.num_output_tokens == second.num_output_tokens == waiting.num_output_tokens == 4


def test_abort_frees_blocks_at_once_waiting_and_running():
    sched = make_scheduler(num_blocks=16, max_num_seqs=1)
    runner = FakeRunner(4)
    running, waiting = add(sched, prompt(9), max_tokens=10), add(sched, prompt(5), max_tokens=10)
    step(sched, runner)
    assert sched.block_manager.num_free_blocks < 16
    assert sched.abort_request(running.request_id) == [running]
    assert sched.block_manager.num_free_blocks == 16 and running.block_ids == []
    assert running.finish_reason is FinishReason.ABORT and running.is_finished
    schedule = sched.schedule()
    assert schedule.finished_seq_ids == [running.seq_id]
    assert [c.seq for c in schedule.chunks] == [waiting]
    output = runner(schedule)
    assert sched.abort_request(waiting.request_id) == [waiting]  # between schedule and update
    assert sched.update(schedule, output) == []
    assert not sched.has_unfinished and sched.block_manager.num_free_blocks == 16
    assert sched.schedule().finished_seq_ids == [waiting.seq_id]


def test_abort_of_a_waiting_request():
    sched = make_scheduler()
    seq = add(sched, prompt(5))
    assert sched.abort_request(seq.request_id) == [seq] and sched.num_waiting == 0
    assert sched.abort_request("no-such-request") == []


def test_n_equals_2_forks_and_both_samples_finish():
    sched = make_scheduler()
    runner = FakeRunner(4)
    parent = add(sched, prompt(6), n=2, max_tokens=5)
    _, sampled = step(sched, runner)
    child = sampled[1]
    assert sampled == [parent, child] and child.sample_index == 1 and sched.num_running == 2
    assert child.output_token_ids == [parent.output_token_ids[0] + 1]
    schedule, _ = step(sched, runner)
    assert len(schedule.block_copies) == 1  # the shared, partially filled last block
    assert parent.block_ids[0] == child.block_ids[0] and parent.block_ids[1] != child.block_ids[1]
    run_all(sched, runner)
    for seq in (parent, child):
        assert seq.finish_reason is FinishReason.LENGTH and seq.num_output_tokens == 5
    assert parent.output_token_ids != child.output_token_ids


def test_abort_request_ends_every_sample():
    sched = make_scheduler()
    parent = add(sched, prompt(6), n=3, max_tokens=5)
    step(sched, FakeRunner(4))
    aborted = sched.abort_request(parent.request_id)
    assert len(aborted) == 3 and all(s.finish_reason is FinishReason.ABORT for s in aborted)
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def _scripted(tokens: list[int]) -> Callable[[Sequence], int]:
    return lambda seq: tokens[seq.num_output_tokens]


def _finish(script: list[int], max_model_len: int = 2048, **params) -> Sequence:
    sched = make_scheduler(max_model_len=max_model_len)
    seq = add(sched, prompt(4), **params)
    run_all(sched, FakeRunner(4, _scripted(script)))
    return seq


def test_stop_conditions():
    script = [5, EOS, 7, 8, 9, 10]
    seq = _finish(script, max_tokens=3)
    assert (seq.finish_reason, seq.output_token_ids) == (FinishReason.STOP, [5, EOS])
    seq = _finish(script, max_tokens=3, ignore_eos=True)
    assert (seq.finish_reason, seq.output_token_ids) == (FinishReason.LENGTH, [5, EOS, 7])
    seq = _finish(script, max_tokens=None, ignore_eos=True, stop_token_ids=[8])
    assert (seq.finish_reason, seq.output_token_ids) == (FinishReason.STOP, [5, EOS, 7, 8])
    seq = _finish(script, max_model_len=7, max_tokens=None, ignore_eos=True)
    assert (seq.finish_reason, seq.output_token_ids) == (FinishReason.LENGTH, [5, EOS, 7])


def test_engine_finish_frees_blocks():
    sched = make_scheduler(num_blocks=8)
    seq = add(sched, prompt(5))
    step(sched, FakeRunner(4))
    sched.finish(seq, FinishReason.STOP)
    assert seq.finish_reason is FinishReason.STOP and not sched.has_unfinished
    assert sched.block_manager.num_free_blocks == 8
    assert sched.schedule().finished_seq_ids == [seq.seq_id]


def test_second_request_reuses_the_cached_prompt():
    sched = make_scheduler()
    runner = FakeRunner(4)
    add(sched, prompt(20), max_tokens=2)
    run_all(sched, runner)
    again = add(sched, prompt(20) + [99], max_tokens=2)
    schedule, _ = step(sched, runner)
    assert again.num_cached_tokens == 20 and schedule.chunks[0].start_pos == 20
    assert sched.block_manager.prefix_hits_tokens == 20


def test_max_len_is_the_context_or_the_whole_cache_whichever_is_smaller():
    """The engine's context length (what engine/prepare.py checks prompts against)."""
    assert make_scheduler(max_model_len=8).max_len == 8
    assert make_scheduler(num_blocks=2, max_model_len=64).max_len == 8  # 2 blocks of 4 tokens


def test_a_sequence_stops_where_the_whole_cache_is_full():
    sched = make_scheduler(num_blocks=2)  # 8 tokens of KV cache
    seq = add(sched, prompt(5), max_tokens=None)
    run_all(sched, FakeRunner(4))
    assert seq.finish_reason is FinishReason.LENGTH and seq.num_tokens == 8


def test_snapshot_lists_live_sequences():
    sched = make_scheduler(max_num_seqs=1)
    first, second = add(sched, prompt(6)), add(sched, prompt(3))
    step(sched, FakeRunner(4))
    snap = sched.snapshot()
    assert (snap.num_running, snap.num_waiting, snap.num_preemptions) == (1, 1, 0)
    assert [(s.seq_id, s.state, s.num_blocks) for s in snap.seqs] == [
        (first.seq_id, "decode", 2),
        (second.seq_id, "waiting", 0),
    ]
    assert snap.seqs[0].num_output_tokens == 1 and snap.blocks.num_used == 2


def test_scheduler_and_block_manager_import_no_torch():
    for name in ("block_manager.py", "scheduler.py"):
        source = (pathlib.Path(__file__).parent.parent / "engine" / name).read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            assert not any(m.split(".")[0] == "torch" for m in modules), (name, modules)


@settings(max_examples=25, deadline=None)
@given(
    requests=st.lists(st.tuples(st.integers(1, 14), st.sampled_from([None, "a", "b", "c"]),
                                st.integers(0, 1)), min_size=1, max_size=10),
    weights=st.tuples(*[st.sampled_from([0.5, 1.0, 3.0])] * 3),
    num_blocks=st.integers(8, 40),
)
def test_keyed_requests_under_pressure_keep_their_tokens(requests, weights, num_blocks):
    """Fair share across keys, priorities and preemption together (the overload suite's fuzz):
    every request finishes with the tokens of a roomy, unkeyed run; the budget and sequence
    limit hold each step; no block is held afterwards (run_all)."""
    def outputs(keyed: bool, blocks: int) -> list[list[int]]:
        sched = make_scheduler(num_blocks=blocks, max_num_batched_tokens=16, max_num_seqs=3)
        seqs = []
        for i, (length, key, priority) in enumerate(requests):
            seq = add(sched, prompt(length, start=3 * i), priority=priority, max_tokens=5)
            if keyed and key is not None:
                seq.share_key, seq.share_weight = key, weights["abc".index(key)]
            seqs.append(seq)
        run_all(sched, FakeRunner(4))
        assert all(s.num_output_tokens == 5 for s in seqs)
        return [s.output_token_ids for s in seqs]

    assert outputs(True, num_blocks) == outputs(False, 200)


def test_admission_hold_lets_a_trickle_join_a_decode_batch_in_groups():
    """admission_hold_steps: a lone arrival waits while every running sequence decodes (a
    graph step), at most N steps in a row; enough arrivals, or a step with a prompt chunk in it
    already, admit at once; 0 admits at once as before."""
    sched = make_scheduler(max_num_seqs=16, max_num_batched_tokens=64, admission_hold_steps=3)
    runner = FakeRunner(4)
    for i in range(4):
        add(sched, prompt(5, start=i), max_tokens=30)
    step(sched, runner)  # all four prefill together
    late = add(sched, prompt(6, start=40), max_tokens=3)
    held = [step(sched, runner)[0] for _ in range(3)]
    assert all(late not in [c.seq for c in s.chunks] for s in held)
    assert all(c.num_new_tokens == 1 for s in held for c in s.chunks)  # decode-only steps
    schedule, _ = step(sched, runner)
    assert late in [c.seq for c in schedule.chunks]  # admitted on the fourth step
    # two arrivals fill an eighth of 16 slots: admitted with no wait
    pair = [add(sched, prompt(6, start=50 + i), max_tokens=3) for i in range(2)]
    schedule, _ = step(sched, runner)
    assert all(seq in [c.seq for c in schedule.chunks] for seq in pair)
    run_all(sched, runner)


def test_admission_hold_gathers_arrivals_into_a_full_batch():
    """A full batch frees one slot per finished request: the replacement still waits (up to N
    steps, or until an eighth of the batch is waiting), so the freed slots fill in one mixed
    step, not one mixed step per slot."""
    sched = make_scheduler(num_blocks=512, max_num_seqs=32, max_num_batched_tokens=256,
                           admission_hold_steps=4)
    runner = FakeRunner(4)
    for i in range(30):
        add(sched, prompt(4, start=i), max_tokens=40)
    short = [add(sched, prompt(4, start=40 + i), max_tokens=2 + i) for i in range(2)]
    step(sched, runner)  # 32 prefill together: the batch is full
    mixed = 0
    for i in range(6):
        if i < 2:
            add(sched, prompt(5, start=80 + i), max_tokens=30)  # a replacement per finish
        schedule, _ = step(sched, runner)
        mixed += schedule.num_batched_tokens != len(schedule.chunks)
    assert all(s.is_finished for s in short)
    assert mixed == 1  # both replacements joined in one step
    assert len(sched.running) == 32 and not sched.waiting
    run_all(sched, runner)


def test_admission_hold_never_holds_an_idle_engine():
    sched = make_scheduler(admission_hold_steps=50)
    seq = add(sched, prompt(5), max_tokens=2)
    schedule, _ = step(sched, FakeRunner(4))
    assert [c.seq for c in schedule.chunks] == [seq]


@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(1, 20), min_size=1, max_size=8), hold=st.integers(0, 6),
       arrive_every=st.integers(1, 4))
def test_admission_hold_keeps_tokens_and_finishes(lengths, hold, arrive_every):
    """Arrivals spread over the steps, any hold: every request finishes with the tokens of an
    unheld run (the hold only delays; run_all checks no block is left)."""
    def outputs(hold_steps: int) -> list[list[int]]:
        sched = make_scheduler(num_blocks=40, max_num_seqs=4, max_num_batched_tokens=16,
                               admission_hold_steps=hold_steps)
        runner, seqs, pending = FakeRunner(4), [], list(enumerate(lengths))
        steps = 0
        while pending or sched.has_unfinished:
            if pending and steps % arrive_every == 0:
                i, n = pending.pop(0)
                seqs.append(add(sched, prompt(n, start=5 * i), max_tokens=4, arrival=float(i)))
            if sched.has_unfinished:
                step(sched, runner)
            steps += 1
            assert steps < 2000
        return [s.output_token_ids for s in seqs]

    assert outputs(hold) == outputs(0)
