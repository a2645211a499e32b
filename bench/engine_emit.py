"""The engine process's emit, on any machine (W7, issue 18 item 4): the step's deltas encoded and
written to the pipe by the engine loop itself ("inline", before `_Outbox`) or by the writer thread
(appliance/engine_process.py's `_Outbox`). A fake step holds the GIL for `--host-ms` (scheduling,
launching, detokenizing), then releases it for `--wait-ms` (the wait for the GPU), then emits
`--requests` deltas; a reader process drains the pipe, as the API process does. Prints ms per
step for each mode, alternating:

    python bench/engine_emit.py --rounds 3
"""

import argparse
import multiprocessing as mp
import time

from hearth.appliance.engine_process import _encode, _Outbox
from hearth.engine.outputs import RequestDelta, SampleDelta


def reader(conn) -> None:
    """The API process's receiver: take messages until told to stop."""
    while conn.recv() != "stop":
        pass


def hold_gil(ms: float) -> None:
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        pass


def run(mode: str, steps: int, wait_ms: float, host_ms: float, requests: int) -> float:
    """Milliseconds per step, the emit done `mode`'s way."""
    receiving, sending = mp.Pipe(duplex=False)
    child = mp.get_context("spawn").Process(target=reader, args=(receiving,))
    child.start()
    outbox = _Outbox(sending) if mode == "outbox" else None
    started = time.perf_counter()
    for step in range(steps):
        hold_gil(host_ms)  # schedule, launch, detokenize
        time.sleep(wait_ms / 1e3)  # wait for the GPU, the GIL released
        deltas = [RequestDelta(f"cmpl-{i:032x}", [SampleDelta(0, " w", [step])], [], False, 0,
                               1.0) for i in range(requests)]
        if outbox is not None:
            outbox.put(("deltas", deltas))
        else:
            sending.send(("deltas", _encode(deltas)))
    if outbox is not None:
        outbox.close()
    elapsed = time.perf_counter() - started
    sending.send("stop")
    child.join()
    return elapsed / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--host-ms", type=float, default=2.0)
    parser.add_argument("--wait-ms", type=float, default=3.0)
    parser.add_argument("--requests", type=int, default=256)
    args = parser.parse_args()
    print("round | mode   | ms per step")
    for rnd in range(args.rounds):
        for mode in ("inline", "outbox"):
            ms = run(mode, args.steps, args.wait_ms, args.host_ms, args.requests)
            print(f"{rnd:5d} | {mode:6s} | {ms:.3f}", flush=True)


if __name__ == "__main__":
    main()
