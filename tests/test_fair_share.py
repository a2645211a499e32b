"""Fair share across API keys: deficit round robin in the scheduler's admission, with the fake
runner of test_scheduler.py (real block manager, real scheduler, no model)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from hearth.engine.fair_share import FairShare
from hearth.engine.sampling_params import SamplingParams
from hearth.engine.sequence import Sequence
from tests.test_scheduler import FakeRunner, make_scheduler, prompt, step


@dataclass
class Item:
    share_key: str | None
    num_tokens: int
    arrival_time: float
    share_weight: float = 1.0
    priority: int = 0


def keyed(sched, key: str | None, length: int, weight: float = 1.0, max_tokens: int = 8,
          priority: int = 0) -> Sequence:
    seq = Sequence(sched.next_seq_id(), f"{key}-{length}", prompt(length),
                   SamplingParams(max_tokens=max_tokens, ignore_eos=True), priority)
    seq.share_key, seq.share_weight = key, weight
    sched.add(seq)
    return seq


def test_one_flow_is_fcfs():
    items = [Item(None, 10, t) for t in (3.0, 1.0, 2.0)]
    assert FairShare().pick(items).arrival_time == 1.0


def test_pick_is_stable_until_charged():
    share = FairShare(quantum=4)
    items = [Item("a", 50, 0.0), Item("b", 10, 1.0)]
    first = share.pick(items)
    assert share.pick(items) is first
    share.charge(first, first.num_tokens)
    items.remove(first)
    assert share.pick(items) is not first


def test_bad_quantum_is_refused():
    with pytest.raises(ValueError, match="quantum"):
        FairShare(quantum=0)


def test_priority_comes_before_fairness():
    share = FairShare()
    share.charge(Item("a", 0, 0.0), 10_000)  # a is deep in debt
    items = [Item("a", 5, 2.0, priority=-1), Item("b", 5, 1.0)]
    assert share.pick(items).share_key == "a"


def test_two_requests_are_not_starved_by_two_hundred():
    sched = make_scheduler(num_blocks=256, max_num_seqs=4, max_num_batched_tokens=64)
    runner = FakeRunner(4)
    heavy = [keyed(sched, "heavy", 16) for _ in range(200)]
    for _ in range(3):
        step(sched, runner)
    light = [keyed(sched, "light", 16) for _ in range(2)]
    steps = 0
    while not all(s.is_finished for s in light):
        step(sched, runner)
        steps += 1
    assert steps < 40  # FCFS would run ~200 heavy requests (hundreds of steps) first
    assert sum(s.is_finished for s in heavy) < 20


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (1.0, 2.0, 4.0)])
def test_busy_keys_share_tokens_by_weight(weights):
    sched = make_scheduler(num_blocks=512, max_num_seqs=6, max_num_batched_tokens=96)
    runner = FakeRunner(4)
    names = ("a", "b", "c")
    for name, weight, length in zip(names, weights, (12, 40, 24), strict=True):
        for _ in range(400):  # different prompt lengths: shares are in tokens, not requests
            keyed(sched, name, length, weight, max_tokens=6)
    for _ in range(600):
        step(sched, runner)
    assert {s.share_key for s in sched.waiting} == set(names)  # all still busy
    served = sched.fair_share.served_tokens()
    total, total_weight = sum(served.values()), sum(weights)
    for name, weight in zip(names, weights, strict=True):
        assert served[name] / total == pytest.approx(weight / total_weight, rel=0.10)
    while sched.has_unfinished:
        step(sched, runner)
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_unkeyed_requests_form_one_flow_beside_keys():
    sched = make_scheduler(num_blocks=256, max_num_seqs=2, max_num_batched_tokens=64)
    runner = FakeRunner(4)
    for _ in range(30):
        keyed(sched, None, 16)
    late = keyed(sched, "k", 16)
    for _ in range(12):
        step(sched, runner)
    assert late.is_finished
