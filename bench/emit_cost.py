"""The engine process's host work a step that the offline engine does not do (W7, issue 18 item 4),
measured on any machine, without a model.

On a GPU the served path is bound by the engine process's host thread (docs/benchmarks.md, W7:
served steps ≈ 1 ms longer than offline ones). Per step and per running request the server
builds a delta (`RequestState.delta`), the loop's tracker observes it, and the engine process
encodes and pickles the step's deltas for the pipe. This script runs exactly that on
`--requests` single-sample streams (the default model's tokenizer from its GGUF, random ids,
one token each a step; the detokenizer's `add_token`, which offline runs too, is timed apart)
and prints the median milliseconds a step of each part.

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
    rng = random.Random(0)
    params = SamplingParams(max_tokens=1_000_000, ignore_eos=True)
    requests, tracker = [], DeltaTracker()
    for i in range(args.requests):
        prompt = [rng.randrange(100, 30_000) for _ in range(args.prompt_len)]
        seq = Sequence(i, f"r{i}", prompt, params)
        seq.status = SequenceStatus.RUNNING
        requests.append((RequestState(f"r{i}", None, prompt, params, 0.0), seq))
        tracker.start(f"r{i}", 1)
    parts = {name: [] for name in ("add_token", "delta", "observe", "encode", "pickle")}
    size = 0
    for _ in range(args.steps):
        token = rng.randrange(100, 30_000)
        marks = [time.perf_counter()]
        for request, seq in requests:
            seq.append_token(token)
            request.add_token(seq, None, tokenizer)
        marks.append(time.perf_counter())
        now = time.monotonic()
        deltas = [d for d in (r.delta(r.finished, now) for r, _ in requests) if d is not None]
        marks.append(time.perf_counter())
        kept = tracker.observe(deltas)
        marks.append(time.perf_counter())
        encoded = _encode(kept)
        marks.append(time.perf_counter())
        size = len(pickle.dumps(("deltas", encoded), protocol=pickle.HIGHEST_PROTOCOL))
        marks.append(time.perf_counter())
        for times, start, end in zip(parts.values(), marks, marks[1:]):
            times.append(1e3 * (end - start))
    skip = min(20, args.steps // 10)  # the first steps warm the caches
    medians = {name: statistics.median(times[skip:]) for name, times in parts.items()}
    print(f"ms a step of {args.requests} requests (median of {args.steps - skip}): "
          + "  ".join(f"{name} {ms:.3f}" for name, ms in medians.items())
          + f"  ({size:,} bytes a step on the pipe)")
    served_only = sum(ms for name, ms in medians.items() if name != "add_token")
    print(f"served only (delta + observe + encode + pickle): {served_only:.3f} ms a step")


if __name__ == "__main__":
    main()
