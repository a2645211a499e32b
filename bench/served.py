"""W7: the served path against the offline engine, on the same prompts, engine options and card.

Users reach Hearth over HTTP, not through `LLM.generate`, so the served output tokens/s is the
number that matters; this script measures it beside the offline engine's (issue 18, item 4:
served ≥ 90% of offline). Both sides get the same random token-id prompts (bench/serve.py's
`build_requests`, ignore EOS, greedy, exact lengths) and the same engine options: the flags after
`--` are `hearth serve` flags, and the offline side builds its engine from the very Settings those
flags make. The offline side detokenizes as the server does. Each side runs in its own process
(the offline one first), each does the same warm-up, then `--runs` timed runs with fresh prompts
(no prefix-cache hits between runs).

    python bench/served.py --num-prompts 512 --input-len 256 --output-len 256 \
        --max-concurrency 256 -- --device cuda --model bench/configs/qwen3-0.6b \
        --load-format dummy --max-num-seqs 256

A model directory without a tokenizer (bench/configs) gets one in a temporary copy of the
directory: `--tokenizer words` (default) is a word-level vocabulary with one word per id of the
model's vocabulary, so every sampled id detokenizes; `--tokenizer DIR` copies DIR's
tokenizer.json (e.g. the default model's, for its shape in bench/configs/smollm2-135m).

The served side also prints the server's per-thread CPU seconds (the event loop's and the
engine thread's; with the engine process, the default on a GPU, that process's in all; `--
--engine-process off|on` picks the mode). To see where a
thread's time goes: HEARTH_PROFILE_ENGINE_THREAD=FILE (the server's engine loop under cProfile,
on its thread or in the engine process, written at shutdown) and HEARTH_PROFILE_OFFLINE=FILE
(the offline side's last run). Both sides' engines also record every step
(HEARTH_STEP_TRACE, engine/step_trace.py); the last table compares them per timed run: steps,
mean batch, tokens per step, step time, time between steps, and the share of step time run
below a full batch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve as serve_bench  # noqa: E402  (bench/serve.py: the client and its statistics)

WARMUP = (1, 3, 16)  # batch sizes of the short warm-up requests, as bench/throughput.py


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    server_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-prompts", type=int, default=512)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--max-concurrency", type=int, default=256)
    parser.add_argument("--token-low", type=int, default=100)
    parser.add_argument("--token-high", type=int, default=30000)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=8077)
    parser.add_argument("--client-procs", type=int,
                        default=max(1, min(8, (os.cpu_count() or 1) // 4)),
                        help="client processes (bench/serve.py); default: a quarter of the cores")
    parser.add_argument("--tokenizer", default="words", help="words | DIR (see the docstring)")
    parser.add_argument("--side", choices=["both", "offline", "served"], default="both")
    parser.add_argument("--json", type=Path, help="write both sides' results here")
    parser.add_argument("--offline-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(own)
    return args, server_args


def requests_for(args: argparse.Namespace, run: int) -> list[serve_bench.BenchRequest]:
    ns = argparse.Namespace(seed=args.seed + run, num_prompts=args.num_prompts,
                            input_len=args.input_len, output_len=args.output_len, range_ratio=0.0,
                            token_low=args.token_low, token_high=args.token_high)
    return serve_bench.build_requests(ns)


def warmup_requests(args: argparse.Namespace) -> list[list[serve_bench.BenchRequest]]:
    base = requests_for(args, 1000)[0].prompt_token_ids
    return [[serve_bench.BenchRequest(base[: 37 + 29 * i], 8) for i in range(n)] for n in WARMUP]


def with_tokenizer(server_args: list[str], choice: str, workdir: Path) -> list[str]:
    """The server flags, with --model pointing at a copy of the model directory that has a
    tokenizer, where the original has none (see the docstring)."""
    if "--model" not in server_args:
        return server_args
    i = server_args.index("--model") + 1
    src = Path(server_args[i])
    if not src.is_dir() or (src / "tokenizer.json").is_file():
        return server_args
    dst = workdir / src.name
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file():
            (dst / path.name).symlink_to(path.resolve())
    cfg = json.loads((src / "config.json").read_text())
    if choice == "words":
        from tokenizers import Tokenizer, models, pre_tokenizers

        vocab = {f"w{i}": i for i in range(cfg["vocab_size"])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.save(str(dst / "tokenizer.json"))
        eos = cfg.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) else eos
        if eos is not None:
            (dst / "tokenizer_config.json").write_text(json.dumps({"eos_token": f"w{eos}"}))
    else:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (Path(choice) / name).is_file():
                shutil.copy(Path(choice) / name, dst / name)
    return [*server_args[:i], str(dst), *server_args[i + 1:]]


def offline_child(args: argparse.Namespace, server_args: list[str]) -> None:
    """The offline side: LLM.generate over the server's own EngineConfig."""
    from hearth import LLM, SamplingParams
    from hearth.appliance.settings import add_arguments, settings_from

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = settings_from(parser.parse_args(server_args), os.environ)
    t0 = time.perf_counter()
    llm = LLM.from_config(settings.engine, progress=False)
    print(f"offline: engine built in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    def generate(batch: list[serve_bench.BenchRequest]) -> tuple[float, int]:
        params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True)
                  for r in batch]
        sync()
        start = time.perf_counter()
        outs = llm.generate([r.prompt_token_ids for r in batch], params, use_tqdm=False)
        sync()
        return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs)

    for batch in warmup_requests(args):
        generate(batch)
    runs, windows = [], []
    profile_to = os.environ.get("HEARTH_PROFILE_OFFLINE")  # the last run, under cProfile
    for run in range(args.runs):
        profiler = None
        if profile_to and run == args.runs - 1:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        window_start = time.monotonic()
        seconds, tokens = generate(requests_for(args, run))
        windows.append((window_start, time.monotonic()))
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile_to)
        runs.append({"duration_s": seconds, "output_tokens": tokens,
                     "output_throughput": tokens / seconds})
        print(f"offline run {run}: {tokens / seconds:,.0f} output tok/s", file=sys.stderr)
    args.offline_child.write_text(json.dumps({"runs": runs, "windows": windows}))
    llm.shutdown()


def sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def run_offline(args: argparse.Namespace, server_args: list[str], trace: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        argv = [sys.executable, __file__, "--offline-child", out.name,
                *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                  if k in ("num_prompts", "input_len", "output_len", "max_concurrency",
                           "token_low", "token_high", "runs", "seed")],
                "--", *server_args]
        subprocess.run(argv, check=True, env={**os.environ, "HEARTH_STEP_TRACE": trace})
        result = json.loads(Path(out.name).read_text())
    result["steps"] = step_summaries(trace, result["windows"])
    return result


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.read()
    except Exception:  # noqa: BLE001 - not up yet
        return None


def run_served(args: argparse.Namespace, server_args: list[str], trace: str) -> dict:
    """The served side: `hearth serve --no-ui` in a child process, bench/serve.py's client."""
    base = f"http://127.0.0.1:{args.port}"
    cmd = [sys.executable, "-m", "hearth", "serve", "--no-ui", "--port", str(args.port),
           *server_args]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env={
        **os.environ, "PYTHONUNBUFFERED": "1", "HEARTH_STEP_TRACE": trace})
    windows: list[tuple[float, float]] = []
    try:
        t0 = time.perf_counter()
        while _get(base + "/health") is None:
            if server.poll() is not None:
                raise RuntimeError(f"`{' '.join(cmd)}` exited with {server.returncode}")
            if time.perf_counter() - t0 > 900:
                raise TimeoutError("the server did not answer /health in 900 s")
            time.sleep(0.2)
        print(f"served: /health after {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        model = json.loads(_get(base + "/v1/models"))["data"][0]["id"]
        client = argparse.Namespace(base_url=base, api_key=None, max_concurrency=None,
                                    request_rate=float("inf"), seed=args.seed, timeout=3600.0)
        for batch in warmup_requests(args):
            asyncio.run(serve_bench.run(client, model, batch))
        client.max_concurrency = args.max_concurrency
        runs = []
        for run in range(args.runs):
            window_start = time.monotonic()
            results, duration = serve_bench.run_in_processes(
                client, model, requests_for(args, run), args.client_procs)
            windows.append((window_start, time.monotonic()))
            summary = serve_bench.summarize(results, duration)
            for failure in [r for r in results if not r.ok][:3]:
                print(f"failed: {failure.error}", file=sys.stderr)
            runs.append(summary)
            print(f"served run {run}: {summary['output_throughput']:,.0f} output tok/s, "
                  f"p99 ITL {summary['p99_itl_ms']:.1f} ms", file=sys.stderr)
        threads = thread_cpu(server.pid)
        print("served: server threads' CPU seconds over its life: " + ", ".join(
            f"{name} {seconds:.1f}" for name, seconds in threads[:6]), file=sys.stderr)
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    return {"runs": runs, "thread_cpu_s": threads, "steps": step_summaries(trace, windows)}


def step_summaries(prefix: str, windows: list[tuple[float, float]]) -> list[dict]:
    """Each timed run's engine steps (engine/step_trace.py: the engine process writes its trace
    at exit; time.monotonic is one clock for every process of the machine)."""
    from hearth.engine.step_trace import summarize

    traces = [json.loads(path.read_text()) for path in Path(prefix).parent.glob(
        Path(prefix).name + ".*.json")]
    traces = [t for t in traces if t["summary"].get("steps")]
    if not traces:
        return []
    columns = max(traces, key=lambda t: t["summary"]["steps"])
    return [summarize(columns, tuple(window)) for window in windows]


def thread_cpu(pid: int) -> list[tuple[str, float]]:
    """CPU seconds (user + system) of each thread of `pid` so far, busiest first (Linux /proc):
    whether the event loop or another thread (the engine's, the busiest other) is saturated."""
    ticks = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        # CPython 3.11 does not name OS threads: the main thread (the event loop) is the pid
        name = "loop (main)" if task.name == str(pid) else f"thread {task.name}"
        fields = stat[stat.rindex(")") + 2:].split()
        totals[name] = totals.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
        # child processes (--engine-process: the engine process), all their threads in one
        try:
            children = (task / "children").read_text().split()
        except OSError:
            children = []
        for child in children:
            name = f"child process {child}"
            totals[name] = totals.get(name, 0.0) + sum(seconds for _, seconds in
                                                       thread_cpu(int(child)))
    return sorted(totals.items(), key=lambda item: -item[1])


def http_stack() -> str:
    """What uvicorn serves with here: httptools and uvloop come with uvicorn[standard], which the
    lock installs; without them (a bare GPU image) it falls back to h11 and asyncio's loop, whose
    per-chunk cost is higher. Served numbers are comparable only on the same stack."""
    import importlib.util

    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return f"uvicorn http={http} loop={loop}"


def main(argv: list[str] | None = None) -> int:
    args, server_args = parse_args(argv)
    if args.offline_child:
        offline_child(args, server_args)
        return 0
    with tempfile.TemporaryDirectory() as workdir:
        server_args = with_tokenizer(server_args, args.tokenizer, Path(workdir))
        trace = str(Path(workdir) / "steps")
        offline = (run_offline(args, server_args, trace + "-offline") if args.side != "served"
                   else {"runs": []})
        served = (run_served(args, server_args, trace + "-served") if args.side != "offline"
                  else {"runs": []})
    print(f"\nW7: {args.num_prompts} requests of {args.input_len} in / {args.output_len} out, "
          f"concurrency {args.max_concurrency}; serve flags: {' '.join(server_args)}; "
          f"{http_stack()}")
    print(f"{'run':>4} | {'offline tok/s':>14} | {'served tok/s':>13} | {'served/offline':>14} | "
          f"{'p50 ITL ms':>10} | {'p99 ITL ms':>10} | {'p50 TTFT ms':>11} | failed")
    for run in range(args.runs):
        off = offline["runs"][run]["output_throughput"] if offline["runs"] else float("nan")
        s = served["runs"][run] if served["runs"] else {}
        on = s.get("output_throughput", float("nan"))
        print(f"{run:>4} | {off:>14,.0f} | {on:>13,.0f} | {on / off:>14.1%} | "
              f"{s.get('median_itl_ms', float('nan')):>10.2f} | "
              f"{s.get('p99_itl_ms', float('nan')):>10.2f} | "
              f"{s.get('median_ttft_ms', float('nan')):>11.1f} | {s.get('failed', '-')}")
    print_steps({"offline": offline.get("steps", []), "served": served.get("steps", [])})
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)},
                                         "server_args": server_args, "offline": offline,
                                         "served": served}, indent=1, default=str))
    return 0


def print_steps(sides: dict[str, list[dict]]) -> None:
    """Where the sides' engines differ: batch size, step time, time between steps."""
    print(f"\n{'engine steps':>12} | {'run':>3} | {'steps':>6} | {'mean batch':>10} | "
          f"{'tokens/step':>11} | {'step p50 ms':>11} | {'step p90 ms':>11} | "
          f"{'between steps':>13} | {'below full':>10} | steps with prompt tokens")
    for side, runs in sides.items():
        for run, s in enumerate(runs):
            if not s.get("steps"):
                continue
            print(f"{side:>12} | {run:>3} | {s['steps']:>6} | {s['mean_running']:>10.1f} | "
                  f"{s['mean_tokens_per_step']:>11.1f} | {s['step_ms_p50']:>11.2f} | "
                  f"{s['step_ms_p90']:>11.2f} | {s['between_steps_s'] / s['wall_s']:>13.1%} | "
                  f"{s['share_of_step_time_below_full']:>10.1%} | {s['prompt_steps']} "
                  f"({s['prompt_steps_s'] / s['inside_steps_s']:.0%} of step time)")


if __name__ == "__main__":
    sys.exit(main())
