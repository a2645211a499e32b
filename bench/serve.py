"""Benchmark a running OpenAI-compatible server, in the style of `vllm bench serve`.

Sends `--num-prompts` streaming /v1/completions requests whose prompts are random token ids (exact
input lengths, no accidental prefix sharing), either as fast as `--max-concurrency` allows or with
Poisson arrivals at `--request-rate`, and reports TTFT, TPOT, ITL and end-to-end latency (mean,
p50, p99) and request / token throughput.

    python bench/serve.py --base-url http://127.0.0.1:8000 --num-prompts 64 \
        --input-len 128 --output-len 128 --max-concurrency 16
    python bench/serve.py --request-rate 4 --range-ratio 0.5   # random lengths in [64, 192]
    python bench/serve.py --max-concurrency 256 --client-procs 4  # a fast server: 4 clients

Lengths: with `--range-ratio r` each request draws input and output lengths uniformly from
[len * (1 - r), len * (1 + r)]; r = 0 (the default) gives fixed lengths. EOS is ignored so that
every request generates exactly its output length.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import httpx


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_len: int = 0
    output_len: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)  # gaps between streamed chunks


def build_requests(args: argparse.Namespace) -> list[BenchRequest]:
    rng = random.Random(args.seed)

    def length(mean: int) -> int:
        low = max(1, math.floor(mean * (1 - args.range_ratio)))
        return rng.randint(low, max(low, math.ceil(mean * (1 + args.range_ratio))))

    return [
        BenchRequest(
            [rng.randrange(args.token_low, args.token_high) for _ in range(length(args.input_len))],
            length(args.output_len),
        )
        for _ in range(args.num_prompts)
    ]


async def send(http: httpx.AsyncClient, model: str, request: BenchRequest) -> RequestResult:
    body = {
        "model": model,
        "prompt": request.prompt_token_ids,
        "max_tokens": request.output_len,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result = RequestResult(prompt_len=len(request.prompt_token_ids))
    start = last = time.perf_counter()
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.output_len = chunk["usage"]["completion_tokens"]
                if chunk.get("error"):
                    result.error = chunk["error"]["message"]
                    return result
                if not any(c.get("text") for c in chunk.get("choices", [])):
                    continue
                if result.ttft_s == 0.0:
                    result.ttft_s = now - start
                else:
                    result.itl_s.append(now - last)
                last = now
        result.latency_s = time.perf_counter() - start
        result.ok = result.output_len > 0
    except httpx.HTTPError as error:
        result.error = f"{type(error).__name__}: {error}"
    return result


async def run(args: argparse.Namespace, model: str, requests: list[BenchRequest]) -> tuple:
    limit = args.max_concurrency or len(requests)
    gate = asyncio.Semaphore(limit)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    rng = random.Random(args.seed + 1)
    async with httpx.AsyncClient(
        base_url=args.base_url, headers=headers, limits=limits, timeout=httpx.Timeout(args.timeout)
    ) as http:

        async def limited(request: BenchRequest) -> RequestResult:
            async with gate:
                return await send(http, model, request)

        start = time.perf_counter()
        tasks = []
        for request in requests:
            tasks.append(asyncio.create_task(limited(request)))
            if math.isfinite(args.request_rate):
                await asyncio.sleep(rng.expovariate(args.request_rate))  # Poisson arrivals
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def _worker(args: argparse.Namespace, model: str, requests: list[BenchRequest],
            start_at: float) -> tuple[list[RequestResult], float]:
    """One client process's share (see `run_in_processes`): sends at `start_at` (time.time())."""
    time.sleep(max(0.0, start_at - time.time()))
    results, _ = asyncio.run(run(args, model, requests))
    return results, time.time()


def run_in_processes(args: argparse.Namespace, model: str, requests: list[BenchRequest],
                     procs: int) -> tuple[list[RequestResult], float]:
    """`run` split over `procs` client processes, each with its share of the requests, the
    concurrency and the request rate; all start at the same moment. One Python client parses
    ≈ 10k streamed chunks a second at most (httpx), fewer than a GPU server sends at high
    concurrency: the client must not be what the benchmark measures."""
    if procs <= 1:
        return asyncio.run(run(args, model, requests))
    limit = args.max_concurrency or len(requests)
    procs = min(procs, limit, len(requests))
    shares = []
    for i in range(procs):
        share = argparse.Namespace(**vars(args))
        share.max_concurrency = limit // procs + (i < limit % procs)
        share.request_rate = args.request_rate / procs
        share.seed = args.seed + 7919 * i
        shares.append(share)
    parts = [requests[i::procs] for i in range(procs)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(procs) as pool:
        start_at = time.time() + 3.0  # every process imported and waiting
        done = pool.starmap(_worker, [(shares[i], model, parts[i], start_at)
                                      for i in range(procs)])
    results: list[RequestResult] = [None] * len(requests)  # type: ignore[list-item]
    for i, (part, _) in enumerate(done):
        results[i::procs] = part
    return results, max(end for _, end in done) - start_at


def summarize(results: list[RequestResult], duration_s: float) -> dict[str, float]:
    done = [r for r in results if r.ok]
    input_tokens = sum(r.prompt_len for r in done)
    output_tokens = sum(r.output_len for r in done)
    tpot = [(r.latency_s - r.ttft_s) / (r.output_len - 1) for r in done if r.output_len > 1]
    summary = {
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
    }
    series = {
        "ttft": [r.ttft_s for r in done],
        "tpot": tpot,
        "itl": [gap for r in done for gap in r.itl_s],
        "e2el": [r.latency_s for r in done],
    }
    for name, values in series.items():
        ms = [v * 1000 for v in values] or [float("nan")]
        summary[f"mean_{name}_ms"] = statistics.fmean(ms)
        summary[f"median_{name}_ms"] = percentile(ms, 50)
        summary[f"p99_{name}_ms"] = percentile(ms, 99)
    return summary


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def report(summary: dict[str, float]) -> None:
    print("{s:{c}^60}".format(s=" Serving Benchmark Result ", c="="))
    rows = [
        ("Successful requests:", "completed", "d"),
        ("Failed requests:", "failed", "d"),
        ("Benchmark duration (s):", "duration_s", ".2f"),
        ("Total input tokens:", "total_input_tokens", "d"),
        ("Total generated tokens:", "total_output_tokens", "d"),
        ("Request throughput (req/s):", "request_throughput", ".2f"),
        ("Output token throughput (tok/s):", "output_throughput", ".2f"),
        ("Total token throughput (tok/s):", "total_token_throughput", ".2f"),
    ]
    for label, key, fmt in rows:
        print(f"{label:<44}{summary[key]:>16{fmt}}")
    titles = {
        "ttft": "Time to First Token",
        "tpot": "Time per Output Token (excl. 1st token)",
        "itl": "Inter-token Latency",
        "e2el": "End-to-end Latency",
    }
    for name, title in titles.items():
        print("{s:{c}^60}".format(s=f" {title} ", c="-"))
        for stat in ("mean", "median", "p99"):
            label = f"{stat.capitalize() if stat != 'p99' else 'P99'} {name.upper()} (ms):"
            print(f"{label:<44}{summary[f'{stat}_{name}_ms']:>16.2f}")
    print("=" * 60)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", help="default: the first model the server lists")
    parser.add_argument("--api-key", default=os.environ.get("HEARTH_API_KEY"))
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument(
        "--range-ratio",
        type=float,
        default=0.0,
        help="0: fixed lengths; r: uniform in [len*(1-r), len*(1+r)]",
    )
    parser.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="requests per second, Poisson arrivals (default: all at once)",
    )
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument(
        "--client-procs",
        type=int,
        default=1,
        help="client processes sharing the requests (a GPU server outruns one Python client)",
    )
    parser.add_argument("--token-low", type=int, default=100)
    parser.add_argument(
        "--token-high",
        type=int,
        default=30000,
        help="prompt token ids are drawn from [token-low, token-high)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--result-json", help="also write the summary and settings here")
    args = parser.parse_args(argv)
    if not 0 <= args.range_ratio < 1:
        parser.error("--range-ratio must be in [0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = (
        args.model
        or httpx.get(f"{args.base_url}/v1/models", headers=headers, timeout=30).json()["data"][0][
            "id"
        ]
    )
    requests = build_requests(args)
    print(
        f"{len(requests)} requests to {args.base_url} ({model}), rate {args.request_rate}, "
        f"max concurrency {args.max_concurrency or 'unlimited'}",
        file=sys.stderr,
    )
    results, duration_s = run_in_processes(args, model, requests, args.client_procs)
    for failure in [r for r in results if not r.ok][:3]:
        print(f"failed: {failure.error}", file=sys.stderr)
    summary = summarize(results, duration_s)
    report(summary)
    if args.result_json:
        with open(args.result_json, "w") as out:
            json.dump(
                {
                    "settings": vars(args),
                    "summary": summary,
                    "requests": [asdict(r) | {"itl_s": None} for r in results],
                },
                out,
                indent=1,
            )
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
