"""Sliding window in the block manager and the scheduler (no torch): blocks every future query has
left behind are released and counted while a sequence runs; what is still read (the window of the
next query) always holds this sequence's own prefix, through forks, copy-on-write, preemption and
prefix-cache hits, which stay correct; a long chat runs in a cache far smaller than its history.

Fake KV as in test_block_manager.py / test_scheduler.py: a slot holds the token prefix up to its
position, so reading a window back proves it holds the right K/V.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from test_block_manager import FakeKV, make_seq
from test_scheduler import EOS, FakeRunner, add, prompt, step

from hearth.engine.block_manager import BlockManager
from hearth.engine.config import SchedulerConfig
from hearth.engine.scheduler import Scheduler
from hearth.engine.sequence import Sequence


class WindowKV(FakeKV):
    def compute(self, seq: Sequence, num_new: int) -> None:
        super().compute(seq, num_new)  # writes, then cache_blocks, as Scheduler.update
        self.bm.drop_out_of_window(seq)

    def check(self, seq: Sequence) -> None:
        """Every position the next query can see holds this sequence's prefix."""
        bs, window = self.bm.block_size, self.bm.sliding_window
        first = max(seq.num_computed_tokens - window + 1, 0)
        assert seq.num_dropped_blocks * bs <= first, seq  # nothing in the window was released
        for pos in range(first, seq.num_computed_tokens):
            block = self.slots[seq.block_ids[pos // bs]]
            assert block[pos % bs] == tuple(seq.token_ids[: pos + 1]), (seq, pos)


def _admit(bm, kv, seq) -> bool:
    hit = bm.match_prefix(seq)
    if not bm.allocate(seq, seq.num_tokens - (hit.num_tokens if hit else 0), hit):
        return False
    kv.compute(seq, seq.num_tokens - seq.num_computed_tokens)
    return True


def _check(bm: BlockManager, live: list[Sequence], kv: WindowKV) -> None:
    refs: dict[int, int] = {}
    for seq in live:
        for block_id in seq.live_block_ids:
            refs[block_id] = refs.get(block_id, 0) + 1
        kv.check(seq)
        # held: the window, the block being filled, and one registered predecessor at most
        held = len(seq.live_block_ids)
        assert held <= -(-(bm.sliding_window + seq.num_tokens - seq.num_computed_tokens)
                         // bm.block_size) + 2, seq
    for block_id in range(bm.num_blocks):
        assert bm.ref_count(block_id) == refs.get(block_id, 0), block_id
        assert bm.is_free(block_id) == (block_id not in refs), block_id
    assert bm.snapshot().num_used == len(refs)


@settings(max_examples=120, deadline=None)
@given(
    ops=st.lists(st.tuples(st.sampled_from(["new", "step", "step", "fork", "free", "preempt"]),
                           st.integers(0, 7), st.lists(st.integers(0, 2), min_size=1,
                                                       max_size=9)), max_size=40),
    block_size=st.sampled_from([2, 4]),
    window=st.integers(1, 9),
    caching=st.booleans(),
)
def test_random_operations_keep_the_window_and_the_counts(ops, block_size, window, caching):
    bm = BlockManager(24, block_size, enable_prefix_caching=caching, sliding_window=window)
    kv, live, ids = WindowKV(bm), [], iter(range(10_000))
    for op, index, tokens in ops:
        if op == "new" or not live:
            seq = make_seq(next(ids), [0, 1, 2, 0, 1, 2, 0, 1][:index] + tokens)
            if _admit(bm, kv, seq):
                seq.append_token(tokens[0])
                live.append(seq)
        else:
            seq = live[index % len(live)]
            if op == "step":
                seq.token_ids.extend(tokens[1:])
                if bm.allocate(seq, seq.num_tokens - seq.num_computed_tokens):
                    kv.compute(seq, seq.num_tokens - seq.num_computed_tokens)
                    seq.append_token(tokens[0])
                else:
                    del seq.token_ids[len(seq.token_ids) - len(tokens) + 1:]
            elif op == "fork":
                child = seq.fork(next(ids), 1, tokens[0])
                bm.fork(seq, child)
                live.append(child)
            elif op == "free":
                bm.free(seq)
                live.remove(seq)
            else:
                bm.free(seq)
                seq.num_computed_tokens = 0
                if _admit(bm, kv, seq):
                    seq.append_token(tokens[0])
                else:
                    live.remove(seq)
        _check(bm, live, kv)
    for seq in live:
        bm.free(seq)
    assert bm.num_free_blocks == 24


def test_blocks_leave_as_the_window_passes():
    bm = BlockManager(16, 4, sliding_window=6)
    kv = WindowKV(bm)
    seq = make_seq(0, list(range(10)))
    assert _admit(bm, kv, seq)  # 10 computed: the next query (10) sees 5..10
    assert seq.num_dropped_blocks == 1 and bm.num_window_freed == 1  # block 0 holds 0..3
    for token in range(20):
        seq.append_token(token)
        assert bm.allocate(seq, 1)
        kv.compute(seq, 1)
    # 30 computed: the next query sees 25..30; blocks 0..5 (positions 0..23) are gone
    assert seq.num_dropped_blocks == 6 and bm.num_window_freed == 6
    assert len(seq.live_block_ids) == 2 and bm.snapshot().num_window_freed == 6
    bm.free(seq)
    assert bm.num_free_blocks == 16


def test_released_blocks_still_serve_prefix_hits():
    """A later prompt with the same start attaches the whole cached prefix (those blocks hold
    their K/V still) and computes the rest; its own window reads the right K/V."""
    bm = BlockManager(32, 4, sliding_window=6)
    kv = WindowKV(bm)
    first = make_seq(0, list(range(20)))
    assert _admit(bm, kv, first) and first.num_dropped_blocks == 3
    second = make_seq(1, list(range(20)) + [7, 7, 7])
    hit = bm.match_prefix(second)
    assert hit.num_tokens == 20 and len(hit.block_ids) == 5
    assert bm.allocate(second, 3, hit)
    kv.compute(second, 3)
    kv.check(second)
    assert second.num_dropped_blocks == 4  # 23 computed: the next query sees 18..23


def test_a_long_chat_runs_in_a_cache_smaller_than_its_history():
    """Window 8, 6 blocks of 4 (24 slots): a 30-token prompt and 100 new tokens, chunked."""
    config = SchedulerConfig(block_size=4, max_num_batched_tokens=8, max_model_len=512)
    sched = Scheduler(config, BlockManager(6, 4, sliding_window=8), eos_token_ids=[EOS])
    assert sched.max_len == 512  # not capped at the cache's 24 slots
    runner = WindowRunner(4, window=8)
    seq = add(sched, prompt(30), max_tokens=100)
    while sched.has_unfinished:
        step(sched, runner)
        assert len(seq.live_block_ids) <= 5
    assert seq.num_output_tokens == 100 and seq.num_preemptions == 0
    # 129 positions computed (the last sample is not): blocks before 129 - 8 + 1 = 122 are gone
    assert sched.block_manager.num_window_freed == 122 // 4


class WindowRunner(FakeRunner):
    def __init__(self, block_size: int, window: int) -> None:
        super().__init__(block_size)
        self.window = window

    def _check_kv(self, seq: Sequence) -> None:
        for pos in range(max(seq.num_tokens - self.window, 0), seq.num_tokens):
            slot = self.slots[seq.block_ids[pos // self.block_size]][pos % self.block_size]
            assert slot == tuple(seq.token_ids[: pos + 1]), (seq, pos)
