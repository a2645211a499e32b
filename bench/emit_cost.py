"""The engine process's host work a step that the offline engine does not do (W7, issue 18 item 4),
measured on any machine, without a model.

On a GPU the served path is bound by the engine process's host thread (docs/benchmarks.md, W7:
served steps ≈ 1 ms longer than offline ones). Per step and per running request the server
builds a delta (`RequestState.delta`), the loop's tracker observes it, and the engine process
encodes and pickles the step's deltas for the pipe. This script runs exactly that on
`--requests` single-sample streams (the default model's tokenizer from its GGUF, random ids,
one token each a step; the detokenizer's `add_token`, which offline runs too, is timed apart)
and prints the median milliseconds a step of each part.

Then the same steps as the engine process runs them now (LLMEngine.emit_token_ids): each request
reports a TokenRow (its new ids, no text) and the API process detokenizes the rows
(appliance/text_streams.py): the engine side's parts, and the API side's (unpickle, deltas) apart.

    python bench/emit_cost.py --gguf PATH_TO_THE_DEFAULT_MODEL.gguf --requests 232
"""

from __future__ import annotations

import argparse
import pickle
import random
import statistics
import time

from hearth.appliance.deltas import DeltaTracker
from hearth.appliance.engine_process import _encode
from hearth.appliance.text_streams import TextStreams
from hearth.engine.loader.gguf_file import read_gguf
from hearth.engine.request_state import RequestState
from hearth.engine.sampling_params import SamplingParams
from hearth.engine.sequence import Sequence, SequenceStatus
from hearth.engine.tokenizer import Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True, help="a GGUF whose tokenizer to use")
    parser.add_argument("--requests", type=int, default=232, help="running requests (W7: 232)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--prompt-len", type=int, default=256)
    args = parser.parse_args()
    tokenizer = Tokenizer.from_gguf_metadata(read_gguf(args.gguf).metadata)
    for ids_only in (False, True):
        medians, size = _measure(args, tokenizer, ids_only)
        parts = "  ".join(f"{name} {ms:.3f}" for name, ms in medians.items())
        print(f"{'token rows' if ids_only else 'deltas':>10}: ms a step of {args.requests} "
              f"requests (median of {args.steps - _skip(args)}): {parts}  ({size:,} bytes a "
              "step on the pipe)")
        engine_side = [ms for name, ms in medians.items() if not name.startswith("api ")
                       and (ids_only or name != "add_token")]
        what = "engine process" if ids_only else "served only, besides add_token"
        print(f"{'':>10}  {what}: {sum(engine_side):.3f} ms a step"
              + (f"; API process {medians['api unpickle'] + medians['api deltas']:.3f} ms"
                 if ids_only else ""))


def _skip(args: argparse.Namespace) -> int:
    return min(20, args.steps // 10)  # the first steps warm the caches


def _measure(args: argparse.Namespace, tokenizer: Tokenizer, ids_only: bool):
    rng = random.Random(0)
    params = SamplingParams(max_tokens=1_000_000, ignore_eos=True)
    requests, tracker, texts = [], DeltaTracker(), TextStreams(tokenizer)
    for i in range(args.requests):
        prompt = [rng.randrange(100, 30_000) for _ in range(args.prompt_len)]
        seq = Sequence(i, f"r{i}", prompt, params)
        seq.status = SequenceStatus.RUNNING
        request = RequestState(f"r{i}", None, prompt, params, 0.0)
        request.ids_only = ids_only
        requests.append((request, seq))
        tracker.start(f"r{i}", 1)
        if ids_only:
            texts.start(f"r{i}", prompt, params)
    names = ["add_token", "row" if ids_only else "delta", "observe", "encode", "pickle"]
    if ids_only:
        names += ["api unpickle", "api deltas"]
    parts = {name: [] for name in names}
    size = 0
    for _ in range(args.steps):
        token = rng.randrange(100, 30_000)
        marks = [time.perf_counter()]
        for request, seq in requests:
            seq.append_token(token)
            request.add_token(seq, None, tokenizer)
        marks.append(time.perf_counter())
        now = time.monotonic()
        if ids_only:
            deltas = [r.token_row() for r, _ in requests]
        else:
            deltas = [d for d in (r.delta(r.finished, now) for r, _ in requests) if d is not None]
        marks.append(time.perf_counter())
        kept = tracker.observe(deltas)
        marks.append(time.perf_counter())
        message = _encode(kept)
        marks.append(time.perf_counter())
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        size = len(data)
        marks.append(time.perf_counter())
        if ids_only:
            _, step_time, _, rows = pickle.loads(data)
            marks.append(time.perf_counter())
            texts.deltas(rows, step_time)
            marks.append(time.perf_counter())
        for times, start, end in zip(parts.values(), marks, marks[1:]):
            times.append(1e3 * (end - start))
    skip = _skip(args)
    return {name: statistics.median(times[skip:]) for name, times in parts.items()}, size

if __name__ == "__main__":
    main()
