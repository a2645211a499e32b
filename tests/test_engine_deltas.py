"""The server's deltas made by the engine itself (LLMEngine.emit_deltas, RequestState.delta) equal
those appliance/deltas.py's DeltaTracker slices from the cumulative outputs, step for step: text,
token ids, logprobs, finish and stop reasons, n > 1 samples, stop strings, and aborts. So do the
engine process's (LLMEngine.emit_token_ids): plain requests report token ids, detokenized by the
API process's TextStreams, which ends a request at its stop string and aborts it in the engine."""

from __future__ import annotations

import pytest

from hearth import LLM, SamplingParams
from hearth.appliance.deltas import DeltaTracker
from hearth.appliance.text_streams import TextStreams
from hearth.engine.request_state import reports_token_ids

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


@pytest.fixture(scope="module")
def speculating_engine():
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}
    return LLM(None, device="cpu", progress=False, speculative=spec).engine


def _run(engine, native: bool | str, abort_after: int | None = None,
         abort: str = "n=3 sampled", requests: dict[str, SamplingParams] = REQUESTS,
         prompt: str = PROMPT) -> dict[str, list]:
    """Every delta of every request, per step, as plain tuples. native: the engine's deltas
    (True), the tracker's (False), or "ids": the engine process's TokenRows through TextStreams,
    as appliance/engine_process.py runs them."""
    tracker = DeltaTracker()
    engine.emit_deltas = bool(native)
    engine.emit_token_ids = native == "ids"
    texts = TextStreams(engine.tokenizer)
    try:
        for request_id, params in requests.items():
            if native == "ids" and reports_token_ids(params):
                texts.start(request_id, engine.prepare(prompt, params).token_ids, params)
            engine.add_request(request_id, prompt, params)
            tracker.start(request_id, params.n)
        seen: dict[str, list] = {request_id: [] for request_id in requests}
        steps = 0
        while engine.has_unfinished_requests():
            outputs = engine.step()
            deltas = tracker.observe(outputs) if native else tracker.update(outputs, 0.0)
            if native == "ids":
                rows = [d for d in deltas if type(d) is tuple]
                deltas = [d for d in deltas if type(d) is not tuple]
                made, stopped = texts.deltas(rows, 0.0)
                deltas += made
                for request_id in stopped:  # the API process's Abort(notify=False)
                    engine.abort_request(request_id)
                    tracker.abort(request_id, 0.0)
            for d in sorted(deltas, key=lambda d: list(requests).index(d.request_id)):
                seen[d.request_id].append((steps, d.finished, d.num_cached_tokens,
                                           tuple(d.prompt_token_ids), [
                    (s.index, s.text, list(s.token_ids), s.logprobs, s.finish_reason,
                     s.stop_reason) for s in d.samples]))
            steps += 1
            if abort_after is not None and steps == abort_after:
                engine.abort_request(abort)
                texts.forget(abort)
                last = tracker.abort(abort, 0.0)
                seen[abort].append(("abort", last and [(s.index, s.finish_reason)
                                                       for s in last.samples]))
        assert not len(texts)  # every stream ended
        return seen
    finally:
        engine.emit_deltas = engine.emit_token_ids = False


def test_engine_deltas_equal_the_trackers(engine):
    assert _run(engine, native=True) == _run(engine, native=False)


def test_an_abort_mid_stream_ends_the_same(engine):
    native, sliced = _run(engine, native=True, abort_after=4), _run(engine, native=False,
                                                                    abort_after=4)
    assert native == sliced
    step, samples = native["n=3 sampled"][-1]
    assert step == "abort" and samples and {r for _, r in samples} == {"abort"}


def test_token_rows_detokenized_by_the_api_process_equal_the_engines_deltas(engine):
    assert _run(engine, native="ids") == _run(engine, native=True)


@pytest.mark.parametrize("abort", ["greedy", "n=3 sampled"])
def test_an_abort_mid_stream_of_token_rows_ends_the_same(engine, abort):
    rows = _run(engine, native="ids", abort_after=4, abort=abort)
    assert rows == _run(engine, native=True, abort_after=4, abort=abort)
    assert rows[abort][-1] == ("abort", [(0, "abort")] if abort == "greedy" else rows[abort][-1][1])


def test_token_rows_of_several_accepted_speculative_tokens(speculating_engine):
    """A speculating step reports several ids in one row; the stop string may fall inside."""
    prompt = "Repeat: one two three four five six seven eight. one two three four five six"
    requests = {"greedy": SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                "stop": SamplingParams(temperature=0, max_tokens=24, stop=[" eight"],
                                       ignore_eos=True)}
    engine_made = [_run(speculating_engine, native=True, requests=requests, prompt=prompt)
                   for _ in range(2)]  # the second with the prompt in the prefix cache, as ids
    ids = _run(speculating_engine, native="ids", requests=requests, prompt=prompt)
    assert ids == engine_made[1]
    assert any(len(step[4][0][2]) > 1 for step in ids["greedy"])  # proposals were accepted
    assert ids["stop"][-1][4][0][4:] == ("stop", " eight")
