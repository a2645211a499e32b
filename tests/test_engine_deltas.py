"""The server's deltas made by the engine itself (LLMEngine.emit_deltas, RequestState.delta) equal
those appliance/deltas.py's DeltaTracker slices from the cumulative outputs, step for step: text,
token ids, logprobs, finish and stop reasons, n > 1 samples, stop strings, and aborts."""

from __future__ import annotations

import pytest

from hearth import LLM, SamplingParams
from hearth.appliance.deltas import DeltaTracker

PROMPT = "Once upon a time, in a small village by the sea, there lived"
REQUESTS = {  # EOS ignored: every request runs for several steps
    "greedy": SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
    "logprobs": SamplingParams(temperature=0, max_tokens=12, logprobs=2, ignore_eos=True),
    "stop string": SamplingParams(temperature=0, max_tokens=40, stop=[".", ","], ignore_eos=True),
    "stop token": SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[28],
                                 ignore_eos=True),
    "n=3 sampled": SamplingParams(n=3, temperature=0.9, seed=7, max_tokens=16, ignore_eos=True),
    "held back": SamplingParams(temperature=0, max_tokens=20, stop=["zzzz-never"],
                                ignore_eos=True),
}


@pytest.fixture(scope="module")
def engine():
    return LLM(None, device="cpu", progress=False).engine


def _run(engine, native: bool, abort_after: int | None = None) -> dict[str, list]:
    """Every delta of every request, per step, as plain tuples."""
    tracker = DeltaTracker()
    engine.emit_deltas = native
    try:
        for request_id, params in REQUESTS.items():
            engine.add_request(request_id, PROMPT, params)
            tracker.start(request_id, params.n)
        seen: dict[str, list] = {request_id: [] for request_id in REQUESTS}
        steps = 0
        while engine.has_unfinished_requests():
            outputs = engine.step()
            deltas = tracker.observe(outputs) if native else tracker.update(outputs, 0.0)
            for d in deltas:
                seen[d.request_id].append((steps, d.finished, d.num_cached_tokens,
                                           tuple(d.prompt_token_ids), [
                    (s.index, s.text, list(s.token_ids), s.logprobs, s.finish_reason,
                     s.stop_reason) for s in d.samples]))
            steps += 1
            if abort_after is not None and steps == abort_after:
                engine.abort_request("n=3 sampled")
                last = tracker.abort("n=3 sampled", 0.0)
                seen["n=3 sampled"].append(("abort", last and [(s.index, s.finish_reason)
                                                               for s in last.samples]))
        return seen
    finally:
        engine.emit_deltas = False


def test_engine_deltas_equal_the_trackers(engine):
    assert _run(engine, native=True) == _run(engine, native=False)


def test_an_abort_mid_stream_ends_the_same(engine):
    native, sliced = _run(engine, native=True, abort_after=4), _run(engine, native=False,
                                                                    abort_after=4)
    assert native == sliced
    step, samples = native["n=3 sampled"][-1]
    assert step == "abort" and samples and {r for _, r in samples} == {"abort"}
