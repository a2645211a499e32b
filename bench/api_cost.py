"""The API process's CPU per streamed token (W7, issue 18 item 4), measured on any machine.

With `--engine-process` the engine steps in a process of its own, so what the API process spends
is the server's own cost: HTTP, SSE chunks, JSON, delivery to the streams, and the two pipe
threads. That cost bounds the served tokens/s whatever the engine does (one API process serves
at most 1e6 / (µs per token) tokens a second). This script serves tests/fake_engine.py (no model,
no GPU: steps of `--step-ms`, one token per running stream a step) with the engine in its own
process, runs `--streams` concurrent streaming completions of `--tokens` tokens with
bench/serve.py's client, and reports the API process's CPU (user + system, /proc, over the timed
runs only) per delivered token and per chunk, and the chunks per token (below 1 when streams
coalesce because the API process fell behind).

    python bench/api_cost.py --streams 128 --tokens 200 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import serve as serve_bench  # noqa: E402  (bench/serve.py: the client)

_SERVER = """
import functools, sys
sys.path.insert(0, {tests!r})
from fake_engine import FakeEngine
from hearth.appliance.settings import Settings
from hearth.cli import serve
settings = Settings(port={port}, no_ui=True, log_level="warning", engine_process={process},
                    max_num_seqs={streams}, max_queued_requests={streams})
factory = functools.partial(FakeEngine, max_model_len={max_len}, max_num_seqs={streams},
                            num_blocks=1_000_000, step_delay_s={step_s})
if {profile!r}:  # the event loop (this main thread) under cProfile, written at exit
    import cProfile
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        code = serve(settings, factory)
    finally:
        profiler.disable()
        profiler.dump_stats({profile!r})
    sys.exit(code)
sys.exit(serve(settings, factory))
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU of `pid`'s own threads (not its children: the engine process)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except Exception:  # noqa: BLE001 - not up yet
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--step-ms", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--port", type=int, default=8079)
    parser.add_argument("--engine-thread", action="store_true",
                        help="the engine on the API process's thread (its CPU then counts too)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--profile", help="write a cProfile of the server's event loop here")
    args = parser.parse_args(argv)
    code = _SERVER.format(tests=str(ROOT / "tests"), port=args.port,
                          process=not args.engine_thread, streams=args.streams,
                          max_len=args.tokens + 16, step_s=args.step_ms / 1000,
                          profile=args.profile or "")
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{args.port}"
    try:
        deadline = time.monotonic() + 120
        while not _up(base + "/health"):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.1)
        client = argparse.Namespace(base_url=base, api_key=None, max_concurrency=args.streams,
                                    request_rate=float("inf"), seed=0, timeout=600.0)
        requests = [serve_bench.BenchRequest([65 + i % 26] * 8, args.tokens)
                    for i in range(args.streams)]
        asyncio.run(serve_bench.run(client, "fake-model", requests[:8]))  # warm-up
        rows = []
        for run in range(args.runs):
            before = cpu_seconds(server.pid)
            results, duration = asyncio.run(serve_bench.run(client, "fake-model", requests))
            used = cpu_seconds(server.pid) - before
            tokens = sum(r.output_len for r in results if r.ok)
            chunks = sum(len(r.itl_s) + 1 for r in results if r.ok)
            rows.append({"run": run, "tokens": tokens, "chunks": chunks, "cpu_s": used,
                         "duration_s": duration, "us_per_token": 1e6 * used / tokens,
                         "us_per_chunk": 1e6 * used / chunks, "tokens_per_s": tokens / duration,
                         "failed": sum(not r.ok for r in results)})
    finally:
        server.terminate()
        server.wait(30)
    mode = "engine thread" if args.engine_thread else "engine process"
    print(f"\nAPI process CPU ({mode}); {args.streams} streams x {args.tokens} tokens, fake steps "
          f"of {args.step_ms} ms")
    print("run | tokens | chunks/token | CPU s | µs/token | µs/chunk | tok/s | failed")
    for r in rows:
        print(f"{r['run']:>3} | {r['tokens']:>6} | {r['chunks'] / r['tokens']:>12.2f} | "
              f"{r['cpu_s']:>5.2f} | {r['us_per_token']:>8.1f} | {r['us_per_chunk']:>8.1f} | "
              f"{r['tokens_per_s']:>7,.0f} | {r['failed']}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
