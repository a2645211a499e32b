"""BlockManager: invariants under random operations, prefix hits, collisions, LRU, copy-on-write.

A fake KV store stands in for the cache tensors: writing position p of a sequence stores the whole
token prefix up to p in that slot, so reading a block table back proves that every computed position
holds the K/V of exactly this sequence's prefix (no lost copy-on-write, no wrong prefix hit).
"""

from __future__ import annotations

import contextlib
from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st

from hearth.engine.block_manager import BlockManager
from hearth.engine.outputs import BlockCopy
from hearth.engine.sampling_params import SamplingParams
from hearth.engine.sequence import Sequence


class FakeKV:
    def __init__(self, bm: BlockManager) -> None:
        self.bm = bm
        self.slots: dict[int, list] = {}

    def compute(self, seq: Sequence, num_new: int) -> None:
        """What the runner and Scheduler.update do for one chunk."""
        for copy in self.bm.take_block_copies():
            self.slots[copy.dst] = list(self.slots.get(copy.src, [None] * self.bm.block_size))
        before = seq.num_computed_tokens
        for pos in range(before, before + num_new):
            block = self.slots.setdefault(
                seq.block_ids[pos // self.bm.block_size], [None] * self.bm.block_size
            )
            block[pos % self.bm.block_size] = tuple(seq.token_ids[: pos + 1])
        seq.num_computed_tokens += num_new
        self.bm.cache_blocks(seq, before)

    def check(self, seq: Sequence) -> None:
        for pos in range(seq.num_computed_tokens):
            block = self.slots[seq.block_ids[pos // self.bm.block_size]]
            assert block[pos % self.bm.block_size] == tuple(seq.token_ids[: pos + 1]), (seq, pos)


def make_seq(seq_id: int, tokens: list[int]) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", tokens, SamplingParams(max_tokens=None))


def admit(bm: BlockManager, kv: FakeKV, seq: Sequence) -> bool:
    """Prefix match, allocate the rest, compute it and sample one token (a prompt's first step)."""
    hit = bm.match_prefix(seq)
    num_computed = hit.num_tokens if hit else 0
    if not bm.allocate(seq, seq.num_tokens - num_computed, hit):
        return False
    kv.compute(seq, seq.num_tokens - seq.num_computed_tokens)
    return True


def check_invariants(bm: BlockManager, live: list[Sequence], kv: FakeKV) -> None:
    refs: dict[int, int] = {}
    for seq in live:
        for block_id in seq.block_ids:
            refs[block_id] = refs.get(block_id, 0) + 1
        kv.check(seq)
    for block_id in range(bm.num_blocks):
        assert bm.ref_count(block_id) == refs.get(block_id, 0)
        assert bm.is_free(block_id) == (block_id not in refs), block_id
    for block_hash, block_id in bm._hash_to_block.items():  # white-box: no stale entries
        assert bm._blocks[block_id].hash == block_hash
    snap = bm.snapshot()
    assert snap.num_used == len(refs) and snap.num_free == bm.num_blocks - len(refs)
    assert all((owner is None) == (b not in refs) for b, owner in enumerate(snap.block_owner))


ops = st.lists(
    st.tuples(
        st.sampled_from(["new", "step", "fork", "free", "preempt"]),
        st.integers(0, 7),  # which live sequence
        st.lists(st.integers(0, 2), min_size=1, max_size=12),  # tokens
    ),
    max_size=40,
)


@settings(max_examples=120, deadline=None)
@given(
    ops=ops,
    block_size=st.sampled_from([2, 4]),
    num_blocks=st.integers(4, 24),
    collide=st.booleans(),
)
def test_random_operations_keep_invariants(ops, block_size, num_blocks, collide):
    constant_hash = mock.patch("hearth.engine.block_manager.block_hash", lambda parent, tokens: 7)
    with constant_hash if collide else contextlib.nullcontext():
        bm = BlockManager(num_blocks, block_size)
        kv, live, ids = FakeKV(bm), [], iter(range(10_000))
        for op, index, tokens in ops:
            _apply(bm, kv, live, ids, op, index, tokens)
            check_invariants(bm, live, kv)
        for seq in live:
            bm.free(seq)
        assert bm.num_free_blocks == num_blocks and bm.usage == 0.0


def _apply(bm, kv, live, ids, op, index, tokens):
    if op == "new" or not live:
        # Prompts built from a few shared stems, so prefix hits are common.
        seq = make_seq(next(ids), [0, 1, 2, 0, 1, 2, 0, 1][:index] + tokens)
        if admit(bm, kv, seq):
            seq.append_token(tokens[0])
            live.append(seq)
        return
    seq = live[index % len(live)]
    if op == "step":
        _step(bm, kv, seq, tokens)
    elif op == "fork":
        child = seq.fork(next(ids), 1, tokens[0])
        bm.fork(seq, child)
        live.append(child)
    elif op == "free":
        bm.free(seq)
        live.remove(seq)
    else:  # preempt by recompute and readmit at once
        bm.free(seq)
        seq.num_computed_tokens = 0
        if admit(bm, kv, seq):
            seq.append_token(tokens[0])
        else:
            live.remove(seq)


def _step(bm, kv, seq, tokens):
    """Compute the pending token plus `tokens[1:]`, then sample; all-or-nothing on failure."""
    table, num_free = list(seq.block_ids), bm.num_free_blocks
    seq.token_ids.extend(tokens[1:])
    if bm.allocate(seq, seq.num_tokens - seq.num_computed_tokens):
        kv.compute(seq, seq.num_tokens - seq.num_computed_tokens)
        seq.append_token(tokens[0])
    else:
        del seq.token_ids[len(seq.token_ids) - len(tokens) + 1 :]
        assert seq.block_ids == table and bm.num_free_blocks == num_free
        assert not bm.take_block_copies()


def test_prefix_hit_reuses_blocks_and_skips_compute():
    bm = BlockManager(num_blocks=32, block_size=16)
    kv = FakeKV(bm)
    prefix = list(range(1000, 1064))
    first = make_seq(0, prefix + [1, 2, 3])
    assert admit(bm, kv, first)
    assert bm.prefix_hits_tokens == 0 and bm.prefix_queries_tokens == 67
    second = make_seq(1, prefix + [9, 9])
    hit = bm.match_prefix(second)
    assert bm.allocate(second, second.num_tokens - hit.num_tokens, hit)
    assert second.num_computed_tokens == 64 and second.num_cached_tokens == 64
    assert second.block_ids[:4] == first.block_ids[:4]
    assert second.block_ids[4] != first.block_ids[4]
    assert bm.prefix_hits_tokens == 64 and bm.prefix_queries_tokens == 67 + 66
    kv.compute(second, 2)
    kv.check(second)


def test_freed_blocks_stay_cached_and_revive():
    bm = BlockManager(num_blocks=8, block_size=4)
    kv = FakeKV(bm)
    first = make_seq(0, list(range(12)))
    assert admit(bm, kv, first)
    blocks = list(first.block_ids)
    bm.free(first)
    assert bm.num_free_blocks == 8 and bm.snapshot().num_cached == 3
    again = make_seq(1, list(range(12)))
    assert admit(bm, kv, again)
    # A full hit still computes the last token, so the logits exist.
    assert again.num_cached_tokens == 11 and again.block_ids == blocks
    assert bm.snapshot().num_cached == 0 and bm.num_free_blocks == 5


def test_hash_collision_never_gives_a_wrong_hit():
    with mock.patch("hearth.engine.block_manager.block_hash", lambda parent, tokens: 0):
        bm = BlockManager(num_blocks=16, block_size=4)
        kv = FakeKV(bm)
        assert admit(bm, kv, make_seq(0, [1, 1, 1, 1, 2, 2, 2, 2, 5]))
        other_first_block = make_seq(1, [3, 3, 3, 3, 2, 2, 2, 2, 5])
        assert bm.match_prefix(other_first_block).block_ids == ()
        same_first_block = make_seq(2, [1, 1, 1, 1, 3, 3, 3, 3, 5])
        assert len(bm.match_prefix(same_first_block).block_ids) == 1
        assert admit(bm, kv, same_first_block)
        kv.check(same_first_block)


def test_collision_with_equal_tokens_but_another_parent_misses():
    with mock.patch("hearth.engine.block_manager.block_hash", lambda parent, tokens: 0):
        bm = BlockManager(num_blocks=16, block_size=4)
        kv = FakeKV(bm)
        assert admit(bm, kv, make_seq(0, [1, 1, 1, 1, 5]))
        # Block 1 has the same tokens as the cached block 0, but its K/V depends on block 0.
        repeated = make_seq(1, [1, 1, 1, 1, 1, 1, 1, 1, 5])
        assert len(bm.match_prefix(repeated).block_ids) == 1
        assert admit(bm, kv, repeated)
        kv.check(repeated)


def test_lru_evicts_least_recently_freed_tail_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    kv = FakeKV(bm)
    first = make_seq(0, [1, 2, 3, 4, 5, 6, 7, 8])
    assert admit(bm, kv, first)
    blocks = list(first.block_ids)
    bm.free(first)
    assert bm.snapshot().num_cached == 4
    other = make_seq(1, [9, 9])
    assert bm.match_prefix(other).block_ids == ()
    assert admit(bm, kv, other)
    assert other.block_ids == [blocks[3]]  # the tail goes first, the prefix stays
    again = make_seq(2, [1, 2, 3, 4, 5, 6, 7, 8])
    assert bm.match_prefix(again).block_ids == tuple(blocks[:3])


def test_uncached_free_blocks_are_used_before_cached_ones():
    bm = BlockManager(num_blocks=4, block_size=2)
    kv = FakeKV(bm)
    cached = make_seq(0, [1, 2])
    assert admit(bm, kv, cached)
    bm.free(cached)
    other = make_seq(1, [3, 4, 5, 6, 7, 8])
    assert admit(bm, kv, other)
    assert bm.match_prefix(make_seq(2, [1, 2, 0])).block_ids  # still cached


def test_a_follow_up_turn_keeps_one_consecutive_block_run():
    """A chat's next turn hits the cached prefix and reuses the finished turn's partial last
    block first (freed blocks without a hash are handed out LIFO), so the table stays one run
    of consecutive blocks: the CPU's decode attention reads such a run in place."""
    bm = BlockManager(num_blocks=64, block_size=4)
    kv = FakeKV(bm)
    turn = make_seq(0, list(range(100, 114)))  # 3 full blocks + a partial one
    assert admit(bm, kv, turn)
    assert turn.block_ids == [0, 1, 2, 3]
    bm.free(turn)
    follow_up = make_seq(1, list(range(100, 114)) + [7, 7, 7, 7, 7, 7])
    assert admit(bm, kv, follow_up)
    assert follow_up.num_cached_tokens == 12
    table = follow_up.block_ids
    assert table == list(range(table[0], table[0] + len(table)))
    kv.check(follow_up)


def test_fork_copies_partial_last_block_on_write():
    bm = BlockManager(num_blocks=8, block_size=4)
    kv = FakeKV(bm)
    parent = make_seq(0, [1, 2, 3, 4, 5, 6])
    assert admit(bm, kv, parent)
    parent.append_token(7)
    child = parent.fork(1, 1, 8)
    bm.fork(parent, child)
    assert child.block_ids == parent.block_ids and bm.ref_count(parent.block_ids[1]) == 2
    shared_last = parent.block_ids[1]
    assert bm.allocate(parent, 1)
    copies = bm.take_block_copies()
    assert copies == [BlockCopy(src=shared_last, dst=parent.block_ids[1])]
    assert parent.block_ids[0] == child.block_ids[0]  # full blocks stay shared
    assert parent.block_ids[1] != child.block_ids[1] == shared_last
    assert bm.allocate(child, 1) and bm.take_block_copies() == []  # now it owns the block alone


def test_allocate_is_all_or_nothing():
    bm = BlockManager(num_blocks=3, block_size=4)
    seq = make_seq(0, list(range(9)))
    assert not bm.allocate(seq, 13)
    assert seq.block_ids == [] and bm.num_free_blocks == 3
    assert bm.allocate(seq, 9) and len(seq.block_ids) == 3 and bm.usage == 1.0


def test_snapshot_reports_owners_and_cached_blocks():
    bm = BlockManager(num_blocks=6, block_size=2)
    kv = FakeKV(bm)
    first, second = make_seq(0, [1, 2, 3]), make_seq(1, [1, 2, 4])
    assert admit(bm, kv, first) and admit(bm, kv, second)
    snap = bm.snapshot()
    assert snap.block_owner[first.block_ids[0]] == (0, 1)
    assert snap.block_owner[first.block_ids[1]] == (0,)
    first_blocks = list(first.block_ids)
    bm.free(first)
    snap = bm.snapshot()
    assert snap.block_owner[first_blocks[0]] == (1,) and snap.block_owner[first_blocks[1]] is None
    assert snap.num_used == 2 and snap.num_cached == 0 and snap.usage == 2 / 6
    assert snap.prefix_hits_tokens == 2
