"""Keystroke latency of code completion: a recorded edit session replayed against the server.

The session: real source files of this repository, joined until the text before the cursor holds
`--context-tokens` tokens (the file the editor has open). Then the next `--typed-chars` characters
of that text are typed at the cursor, one request per `--every` (3) characters at `--chars-per-s`.
Each request streams `--max-tokens` tokens; the next keystroke cancels it (the client hangs up),
as an IDE's autocomplete does. Reported: time to first token, p50 / p99 over the keystrokes (the
first, cold request apart; a request cancelled before its first token counts as infinitely late),
and the prefix-cache hit rate over the typed requests (prompt tokens found in the cache /
prompt tokens, from vllm:prefix_cache_* in /metrics).

    prefix-only (default)   /v1/completions, prompt = the code before the cursor
    --fim                   + suffix = `--suffix-tokens` of the code after the typed region, as
                            the server lays it out for the model's FIM tokens (needs a FIM model)
    --token-ids             tokenize here with the default model's tokenizer and send token ids;
                            with --fim the layout is built here from `--fim-ids` (Qwen's)

CPU, default model (no FIM tokens, so prefix-only):
    python bench/fim.py [--dtype bfloat16 --gguf-keep-quantized]
GPU, Qwen3-0.6B shape with random weights (no tokenizer in bench/configs: --token-ids):
    python bench/fim.py --device cuda --model bench/configs/qwen3-0.6b --load-format dummy \
        --token-ids --context-tokens 8000 [--fim]

The server runs in this process (one uvicorn thread, the engine thread); `--url` measures a
server that is already running instead. `--offline` drives the engine directly (LLMEngine: add,
step, abort; no HTTP, so no fastapi / uvicorn needed; prompts as token ids or plain text):
    python bench/fim.py --offline --device cuda --model bench/configs/qwen3-0.6b \
        --load-format dummy --token-ids --context-tokens 8000 [--fim]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

try:
    import httpx
except ImportError:  # --offline needs no HTTP client (the GPU machine may lack httpx)
    httpx = None

ROOT = Path(__file__).resolve().parent.parent
FILES = ["engine/scheduler.py", "engine/block_manager.py", "engine/llm_engine.py",
         "appliance/serving/core.py", "engine/model_runner.py", "engine/sampler.py",
         "appliance/async_engine.py", "engine/tokenizer.py", "engine/catalog.py"]
QWEN_FIM_IDS = "151659,151661,151660"  # <|fim_prefix|>, <|fim_suffix|>, <|fim_middle|>
_in_flight = None  # the in-process server's request count (a diagnostic per keystroke)


@dataclass
class Keystroke:
    index: int
    prompt_tokens: int
    ttft_s: float | None  # None: cancelled before its first token
    in_flight: int | None = None  # requests the server held as this one was sent (in-process)


def main() -> None:
    args = _parse()
    if args.offline:
        report = _run_offline(args)
    else:
        with _server(args) as url:
            report = asyncio.run(_run(args, url))
    print(json.dumps(report["summary"], indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (default: start one in this process)")
    p.add_argument("--model", help="catalogue name or path (default: the default model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--gguf-keep-quantized", action="store_true",
                   help="CPU with --dtype bfloat16: the GGUF's 4-bit linears through the int4 GEMV")
    p.add_argument("--context-tokens", type=int, default=2000)
    p.add_argument("--typed-chars", type=int, default=300)
    p.add_argument("--every", type=int, default=3, help="characters per request")
    p.add_argument("--chars-per-s", type=float, default=15.0, help="typing speed")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--fim", action="store_true")
    p.add_argument("--suffix-tokens", type=int, default=512)
    p.add_argument("--token-ids", action="store_true")
    p.add_argument("--tokenizer-json", help="--token-ids: this tokenizer.json instead of the "
                   "default model's (a machine without the default model installed)")
    p.add_argument("--fim-ids", default=QWEN_FIM_IDS, help="prefix,suffix,middle token ids")
    p.add_argument("--offline", action="store_true", help="the engine without HTTP")
    p.add_argument("--json", help="write keystrokes and summary here")
    return p.parse_args()


@contextlib.contextmanager
def _server(args: argparse.Namespace):
    if args.url:
        yield args.url.rstrip("/") + "/"
        return
    from hearth.appliance.lifecycle import bind, make_server
    from hearth.appliance.routes import create_app
    from hearth.appliance.settings import Settings
    from hearth.engine.config import EngineConfig

    settings = Settings(model=args.model, device=args.device, dtype=args.dtype, no_ui=True)
    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                          load_format=args.load_format,
                          gguf_keep_quantized=args.gguf_keep_quantized)

    def engine():
        from hearth.engine.llm_engine import LLMEngine

        return LLMEngine(config, progress=False)

    sock = bind("127.0.0.1", 0)
    app = create_app(settings, engine)
    server = make_server(app, app.state.hearth, sock)
    global _in_flight
    _in_flight = lambda: app.state.hearth.engine.num_in_flight  # noqa: E731
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        _wait_healthy(server.url, app.state.hearth.engine)
        yield server.url
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def _wait_healthy(url: str, engine, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if engine.error is not None:
            raise RuntimeError(f"the engine failed to load: {engine.error}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "health", timeout=5).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError("the server did not become healthy")


class Session:
    """The edit session: the text, where the cursor starts, and each keystroke's request body."""

    def __init__(self, args: argparse.Namespace, encode) -> None:
        self.args, self.encode = args, encode
        text = "".join(f"# ---- {name}\n{(ROOT / name).read_text()}" for name in FILES)
        chars_per_token = len(text) / len(encode(text))
        self.cursor = text.rfind("\n", 0, int(args.context_tokens * chars_per_token)) + 1
        end = self.cursor + args.typed_chars
        suffix_chars = int(args.suffix_tokens * chars_per_token)
        self.text, self.suffix = text, text[end : end + suffix_chars]
        if len(self.text) < end + suffix_chars:
            raise ValueError("not enough source text for --context-tokens; add files to FILES")
        self.fim_ids = [int(i) for i in args.fim_ids.split(",")]

    @property
    def num_requests(self) -> int:
        return self.args.typed_chars // self.args.every + 1  # the first: nothing typed yet

    def body(self, index: int) -> tuple[dict, int]:
        """The request of keystroke `index` and its prompt length in tokens."""
        prefix = self.text[: self.cursor + index * self.args.every]
        body = {"max_tokens": self.args.max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True}
        if not self.args.token_ids:
            body["prompt"] = prefix
            if self.args.fim:
                body["suffix"] = self.suffix
            return body, len(self.encode(prefix)) + (
                len(self.encode(self.suffix)) + 3 if self.args.fim else 0)
        ids = self.encode(prefix)
        if self.args.fim:
            pre, suf, mid = self.fim_ids
            ids = [pre, *ids, suf, *self.encode(self.suffix), mid]
        body["prompt"] = ids
        return body, len(ids)


async def _run(args: argparse.Namespace, url: str) -> dict:
    encode = _encoder(args, url)
    session = Session(args, encode)
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        keystrokes, before = await _type(session, http)
        after = _prefix_counters((await http.get("metrics")).text)
    return _report(args, keystrokes, before, after)


def _report(args: argparse.Namespace, keystrokes: list[Keystroke], before: tuple[float, float],
            after: tuple[float, float]) -> dict:
    queries, hits = (a - b for a, b in zip(after, before, strict=True))
    warm = [k.ttft_s if k.ttft_s is not None else math.inf for k in keystrokes[1:]]
    summary = {
        "mode": ("fim" if args.fim else "prefix-only") + (", offline" if args.offline else ""),
        "tokenizer": getattr(args, "tokenizer", "the server's"),
        "context_tokens": keystrokes[0].prompt_tokens,
        "requests": len(keystrokes),
        "interval_ms": round(1000 * args.every / args.chars_per_s, 1),
        "cold_ttft_ms": _ms(keystrokes[0].ttft_s),
        "p50_ttft_ms": _ms(_percentile(warm, 50)),
        "p99_ttft_ms": _ms(_percentile(warm, 99)),
        "p50_ttft_answered_ms": _ms(_percentile([w for w in warm if w != math.inf] or [math.inf],
                                                50)),  # over the requests that got a token
        "mean_ttft_ms": _ms(statistics.fmean([w for w in warm if w != math.inf] or [math.inf])),
        "cancelled_before_first_token": sum(w == math.inf for w in warm),
        "max_in_flight_at_a_keystroke": max((k.in_flight or 0) for k in keystrokes),
        "prefix_cache_hit_rate": round(hits / queries, 4) if queries else None,  # typing only
    }
    return {"summary": summary, "keystrokes": [asdict(k) for k in keystrokes]}


def _run_offline(args: argparse.Namespace) -> dict:
    """The same session against LLMEngine in this thread: a keystroke aborts the request before
    it and adds its own between two engine steps (as the server's engine thread does)."""
    from hearth.engine.config import EngineConfig
    from hearth.engine.llm_engine import LLMEngine
    from hearth.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                                    load_format=args.load_format,
                                    gguf_keep_quantized=args.gguf_keep_quantized), progress=False)
    if not args.token_ids:
        args.tokenizer = "the engine's"
    session = Session(args, _encoder(args, None, engine.tokenizer))
    if args.fim and not args.token_ids:
        raise ValueError("--offline --fim builds the layout here: add --token-ids")
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    bodies = [session.body(i) for i in range(session.num_requests)]
    prompts = [(body["prompt"], num_tokens) for body, num_tokens in bodies]
    _first_token(engine, "warm-up", "def warm_up():" if not args.token_ids else [1, 2], params)
    keystrokes = [Keystroke(0, prompts[0][1], _first_token(engine, "k0", prompts[0][0], params))]
    before = _engine_counters(engine)
    _type_offline(engine, prompts, params, keystrokes, args.every / args.chars_per_s)
    return _report(args, keystrokes, before, _engine_counters(engine))


def _first_token(engine, request_id: str, prompt, params) -> float:
    """Add a request, step until its first token, abort it; the time to first token."""
    sent = time.perf_counter()
    engine.add_request(request_id, prompt, params)
    while not any(o.request_id == request_id and o.outputs[0].token_ids for o in engine.step()):
        pass
    ttft = time.perf_counter() - sent
    engine.abort_request(request_id)
    return ttft


def _type_offline(engine, prompts, params, keystrokes: list[Keystroke], interval: float) -> None:
    start, current, sent = time.perf_counter(), None, 0.0
    for i, (prompt, num_tokens) in enumerate(prompts[1:], start=1):
        while time.perf_counter() < start + (i - 1) * interval:
            if current is None:
                time.sleep(0.001)
            else:
                _step_offline(engine, keystrokes[-1], sent)
        if current is not None:
            engine.abort_request(current)
        current, sent = f"k{i}", time.perf_counter()
        keystrokes.append(Keystroke(i, num_tokens, None))
        engine.add_request(current, prompt, params)
    while keystrokes[-1].ttft_s is None:
        _step_offline(engine, keystrokes[-1], sent)
    engine.abort_request(current)


def _step_offline(engine, keystroke: Keystroke, sent: float) -> None:
    if not engine.has_unfinished_requests():
        time.sleep(0.001)
        return
    for output in engine.step():
        if output.request_id == f"k{keystroke.index}" and output.outputs[0].token_ids:
            keystroke.ttft_s = keystroke.ttft_s or time.perf_counter() - sent


def _engine_counters(engine) -> tuple[float, float]:
    blocks = engine.snapshot().blocks
    return blocks.prefix_queries_tokens, blocks.prefix_hits_tokens


def _encoder(args: argparse.Namespace, url: str | None, engine_tokenizer=None):
    """Text → token ids: the server's /tokenize (or the engine's tokenizer, --offline), or here
    (--token-ids) the default model's tokenizer, else UTF-8 bytes (ids 256 + byte) where the
    default model is not installed."""
    if not args.token_ids and engine_tokenizer is not None:
        return lambda text: engine_tokenizer.encode(text, add_special_tokens=False)
    if not args.token_ids:
        return lambda text: httpx.post(
            url + "tokenize", json={"prompt": text, "add_special_tokens": False}, timeout=60
        ).json()["tokens"]
    if args.tokenizer_json:
        from tokenizers import Tokenizer as HFTokenizer

        hf_tokenizer = HFTokenizer.from_file(args.tokenizer_json)
        args.tokenizer = args.tokenizer_json
        return lambda text: hf_tokenizer.encode(text, add_special_tokens=False).ids
    try:
        from hearth.engine.catalog import resolve_model
        from hearth.engine.loader.gguf_file import read_gguf
        from hearth.engine.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_gguf_metadata(read_gguf(resolve_model(None).path).metadata)
        args.tokenizer = "default model (SmolLM2 BPE)"
        return lambda text: tokenizer.encode(text, add_special_tokens=False)
    except (ImportError, ValueError):
        args.tokenizer = "UTF-8 bytes (the default model is not installed)"
        return lambda text: [256 + b for b in text.encode("utf-8")]


async def _type(
    session: Session, http: httpx.AsyncClient
) -> tuple[list[Keystroke], tuple[float, float]]:
    """The cold request (the file just opened) runs to its first token; then one request per
    keystroke at the typing pace, each cancelling the one before. Also returns the prefix-cache
    counters as the typing starts."""
    interval = session.args.every / session.args.chars_per_s
    bodies = [session.body(i) for i in range(session.num_requests)]  # tokenized ahead of time
    warmup = {**bodies[0][0], "prompt": "def warm_up():" if not session.args.token_ids else [1]}
    warmup.pop("suffix", None)
    await _stream(http, warmup)  # the server's code paths, not the file's cache
    keystrokes = [Keystroke(0, bodies[0][1], None)]
    await _stream(http, bodies[0][0], keystrokes[0], until_first_token=True)
    await asyncio.sleep(0.5)  # the cold request's abort lands before the counters are read
    counters = _prefix_counters((await http.get("metrics")).text)
    start = time.perf_counter()
    current: asyncio.Task | None = None
    for i, (body, num_tokens) in enumerate(bodies[1:], start=1):
        await asyncio.sleep(max(0.0, start + (i - 1) * interval - time.perf_counter()))
        if current is not None:
            current.cancel()
            await asyncio.gather(current, return_exceptions=True)
        keystrokes.append(Keystroke(i, num_tokens, None, _in_flight() if _in_flight else None))
        current = asyncio.ensure_future(_stream(http, body, keystrokes[-1]))
    await asyncio.gather(current, return_exceptions=True)
    return keystrokes, counters


async def _stream(http: httpx.AsyncClient, body: dict, keystroke: Keystroke | None = None,
                  until_first_token: bool = False) -> None:
    sent = time.perf_counter()
    async with http.stream("POST", "v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread()).decode()}")
        async for line in response.aiter_lines():
            if line.startswith("data: ") and keystroke is not None and keystroke.ttft_s is None:
                keystroke.ttft_s = time.perf_counter() - sent
                if until_first_token:
                    return  # hang up


def _prefix_counters(metrics: str) -> tuple[float, float]:
    values = {}
    for line in metrics.splitlines():
        for name in ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"):
            if line.startswith(name):
                values[name] = float(line.rsplit(" ", 1)[1])
    return values["vllm:prefix_cache_queries_total"], values["vllm:prefix_cache_hits_total"]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)]


def _ms(seconds: float | None) -> float | None:
    if seconds is None or seconds == math.inf:
        return None
    return round(1000 * seconds, 1)


if __name__ == "__main__":
    main()
