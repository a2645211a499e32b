"""Tail latency under load: many tiny requests at a fixed concurrency, p50 / p99 end to end.

Issue 20's load: concurrency 16, 4-token completions, 1,200 requests, half of them streamed (the
two halves interleave, so both see the same load); prints p50 / p90 / p99 / max for all requests,
per mode (streamed vs not), and the worst requests' arrival order. It starts `hearth serve` (the
default model, no UI) on a free port unless `--base-url` points at a running server.

    .venv/bin/python bench/tail_latency.py                      # 1,200 requests, concurrency 16
    .venv/bin/python bench/tail_latency.py --num-requests 300 --json out.json
    .venv/bin/python bench/tail_latency.py --base-url http://127.0.0.1:8000
    .venv/bin/python bench/tail_latency.py --fake       # the fake engine: the HTTP layer alone
    .venv/bin/python bench/tail_latency.py --fake --real-heap   # ... in a real server's heap

Results go to docs/benchmarks.md ("Tail latency").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import httpx

_PROMPT = "Write one word about the sea."
_FAKE_SERVER = """import sys; sys.path.insert(0, {tests!r})
{preload}
from fake_engine import FakeEngine
from hearth.appliance.settings import Settings
from hearth.cli import serve
serve(Settings(no_ui=True, port={port}, log_level="warning"), lambda: FakeEngine(max_num_seqs=64))
"""


@dataclass
class Sample:
    index: int
    stream: bool
    status: int = 0
    latency_s: float = 0.0
    start_s: float = 0.0  # since the run began


async def _one(http: httpx.AsyncClient, index: int, stream: bool, args, t0: float) -> Sample:
    body = {"model": args.model, "prompt": _PROMPT, "max_tokens": args.max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": stream}
    sample = Sample(index, stream)
    start = time.perf_counter()
    sample.start_s = start - t0
    try:
        if stream:
            async with http.stream("POST", "/v1/completions", json=body) as response:
                sample.status = response.status_code
                async for _ in response.aiter_lines():
                    pass
        else:
            sample.status = (await http.post("/v1/completions", json=body)).status_code
    except httpx.HTTPError:
        sample.status = -1
    sample.latency_s = time.perf_counter() - start
    return sample


async def run_load(args) -> list[Sample]:
    gate = asyncio.Semaphore(args.concurrency)
    limits = httpx.Limits(max_connections=args.concurrency,
                          max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=args.base_url, limits=limits,
                                 timeout=httpx.Timeout(300)) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        args.model = model
        for i in range(args.warmup):  # the first requests compile and fill caches
            await _one(http, -1, i % 2 == 1, args, time.perf_counter())
        t0 = time.perf_counter()

        async def limited(i: int) -> Sample:
            async with gate:
                return await _one(http, i, i % 2 == 1, args, t0)

        tasks = [asyncio.ensure_future(limited(i)) for i in range(args.num_requests)]
        done, pending = await asyncio.wait(tasks, timeout=args.max_seconds)
        for task in pending:  # over the time limit: reported as not answered (status 0)
            task.cancel()
        return [t.result() if t in done else Sample(i, i % 2 == 1)
                for i, t in enumerate(tasks)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(samples: list[Sample]) -> dict[str, dict[str, float]]:
    groups = {"all": samples, "streamed": [s for s in samples if s.stream],
              "not streamed": [s for s in samples if not s.stream]}
    out = {}
    for name, group in groups.items():
        ok = [s.latency_s for s in group if s.status == 200]
        if not ok:
            continue
        p50 = percentile(ok, 50)
        out[name] = {"n": len(group), "ok": len(ok), "p50_s": p50, "p90_s": percentile(ok, 90),
                     "p99_s": percentile(ok, 99), "max_s": max(ok),
                     "p99_over_p50": percentile(ok, 99) / p50}
    return out


def report(summary: dict[str, dict[str, float]], samples: list[Sample], wall_s: float) -> None:
    print(f"{len(samples)} requests in {wall_s:.1f} s ({len(samples) / wall_s:.1f} req/s)")
    print(f"{'':14}{'n':>6}{'ok':>6}{'p50 s':>9}{'p90 s':>9}{'p99 s':>9}{'max s':>9}{'p99/p50':>9}")
    for name, row in summary.items():
        print(f"{name:14}{row['n']:>6}{row['ok']:>6}{row['p50_s']:>9.3f}{row['p90_s']:>9.3f}"
              f"{row['p99_s']:>9.3f}{row['max_s']:>9.3f}{row['p99_over_p50']:>9.1f}")
    worst = sorted(samples, key=lambda s: -s.latency_s)[:5]
    print("slowest:", ", ".join(f"#{s.index} {'S' if s.stream else 'N'} started {s.start_s:.1f}s "
                                f"took {s.latency_s:.2f}s" for s in worst))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args) -> subprocess.Popen:
    port = _free_port()
    args.base_url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "hearth", "serve", "--no-ui", "--port", str(port),
               *args.serve_args]
    if args.fake:  # tests/fake_engine.py: the HTTP layer alone, steps of a few milliseconds
        tests = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")
        preload = "from hearth import LLM; heap = LLM(progress=False)" if args.real_heap else ""
        command = [sys.executable, "-c", _FAKE_SERVER.format(tests=tests, port=port,
                                                             preload=preload)]
    server = subprocess.Popen(command, env={**os.environ, "HEARTH_LOG_LEVEL": "warning"})
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        try:
            if httpx.get(args.base_url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.terminate()
    raise SystemExit("the server did not become healthy in 600 s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", help="a running server (default: start one)")
    parser.add_argument("--num-requests", type=int, default=1200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=1800,
                        help="stop the load after this long; unanswered requests count as failed")
    parser.add_argument("--json", help="write the summary and every sample here")
    parser.add_argument("--fake", action="store_true",
                        help="serve tests/fake_engine.py instead of the model: the server's own "
                        "share of the latency")
    parser.add_argument("--real-heap", action="store_true",
                        help="with --fake: load the default model first (unused), so that the "
                        "server holds a real server's heap (garbage-collector pauses)")
    parser.add_argument("serve_args", nargs="*", help="extra `hearth serve` flags (after --)")
    args = parser.parse_args(argv)
    server = None if args.base_url else start_server(args)
    try:
        start = time.perf_counter()
        samples = asyncio.run(run_load(args))
        wall_s = time.perf_counter() - start
    finally:
        if server is not None:
            server.terminate()
            server.wait(60)
    summary = summarize(samples)
    report(summary, samples, wall_s)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"summary": summary, "samples": [asdict(s) for s in samples]}, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
