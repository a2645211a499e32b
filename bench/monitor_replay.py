"""The monitor tab under a GPU's load, recorded on the GPU machine and rendered elsewhere.

The lent GPU machines have no browser (no Chromium, no display, no network to fetch one), so the
monitor screenshot with a filled GPU panel (issue 18, item 7) is taken in two steps:

1. `record` on the GPU machine: the real server (`hearth serve` flags after `--`, no UI) in this
   process, a streamed load from bench/serve.py's client, and once a second what the monitor
   tab reads: the engine snapshot, the NVML GPU sample, the host sample, the per-key rows and the
   server's capabilities. Written with pickle (the engine's own snapshot classes).

       python bench/monitor_replay.py record monitor.pkl --seconds 20 --concurrency 48 -- \\
           --device cuda --model bench/configs/qwen3-0.6b --load-format dummy

2. `render` here: the real UI (ui/app.py, the same monitor code) over a server whose engine
   snapshot, GPU and host readings replay the recording at its own pace, opened in headless
   Chromium (Playwright); the screenshot is taken after the last frame.

       python bench/monitor_replay.py render monitor.pkl docs/ui-monitor-gpu.png

Every number on the rendered page was read on the GPU machine; only the browser is elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import pickle
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.fake_engine (render)
import serve as serve_bench  # noqa: E402  (bench/serve.py: the client)
import served  # noqa: E402  (bench/served.py: a tokenizer for bench/configs models)


@dataclasses.dataclass
class Frame:
    """What the monitor read at one refresh."""

    time: float  # time.monotonic() on the recording machine
    snapshot: Any
    gpus: list
    gpu_status: str
    host: Any
    key_rows: list


@dataclasses.dataclass
class Recording:
    capabilities: list[str]
    frames: list[Frame]


# ---- record (the GPU machine) ----


def _serve(server_args: list[str]):
    from hearth.appliance.routes import create_app
    from hearth.appliance.settings import add_arguments, settings_from
    from hearth.cli import engine_factory

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = dataclasses.replace(settings_from(parser.parse_args(server_args), os.environ),
                                   port=0)
    app = create_app(settings, engine_factory(settings))
    return (app.state.hearth, *_start(app))


def _start(app: Any) -> tuple[Any, threading.Thread, int]:
    """The app's server on a free local port, on a thread: (server, thread, port)."""
    from hearth.appliance.lifecycle import bind, make_server

    sock = bind("127.0.0.1", 0)
    server = make_server(app, app.state.hearth, sock)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    return server, thread, sock.getsockname()[1]


def _wait_ready(context: Any, timeout_s: float = 900.0) -> None:
    start = time.monotonic()
    while context.engine.snapshot() is None:
        if time.monotonic() - start > timeout_s:
            raise TimeoutError("the engine did not load")
        time.sleep(0.2)


def record(args: argparse.Namespace, server_args: list[str]) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        server_args = served.with_tokenizer(server_args, "words", Path(workdir))
        context, server, thread, port = _serve(server_args)
        try:
            _wait_ready(context)
            model = json.loads(_http_get(f"http://127.0.0.1:{port}/v1/models"))["data"][0]["id"]
            client = argparse.Namespace(
                base_url=f"http://127.0.0.1:{port}", api_key=None,
                max_concurrency=args.concurrency, request_rate=args.request_rate, seed=0,
                timeout=3600.0)
            requests = serve_bench.build_requests(argparse.Namespace(
                seed=0, num_prompts=args.num_prompts, input_len=args.input_len,
                output_len=args.output_len, range_ratio=0.5, token_low=100,
                token_high=args.token_high))
            load = threading.Thread(target=_send_load, args=(client, model, requests), daemon=True)
            load.start()
            frames = _sample(context, args.seconds)
            # plain dicts around the engine's own classes: readable whatever module loads them
            args.out.write_bytes(pickle.dumps({
                "capabilities": list(context.serving.capabilities()),
                "frames": [vars(f) for f in frames]}))
            last = frames[-1]
            print(f"recorded {len(frames)} frames: {last.snapshot.device}, "
                  f"{[g.name for g in last.gpus]}, running {last.snapshot.scheduler.num_running},"
                  f" {last.snapshot.num_generation_tokens_total} tokens generated",
                  file=sys.stderr)
        finally:  # the load's streams are cut: only the recording matters now
            server.force_exit = server.should_exit = True
            thread.join(10)


def _send_load(client: argparse.Namespace, model: str, requests: list) -> None:
    try:
        results, _ = asyncio.run(serve_bench.run(client, model, requests))
        failed = [r.error for r in results if not r.ok]
        if failed:
            print(f"load: {len(failed)} of {len(results)} failed, e.g. {failed[0]}",
                  file=sys.stderr)
    except Exception as error:  # noqa: BLE001 - the server stopping ends the load
        print(f"load ended: {type(error).__name__}: {error}", file=sys.stderr)


def _sample(context: Any, seconds: float) -> list[Frame]:
    telemetry, frames = context.telemetry, []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        tick = time.monotonic()
        frames.append(Frame(tick, context.engine.snapshot(), telemetry.gpu.sample(),
                            telemetry.gpu.status, telemetry.host.sample(), context.auth.rows()))
        time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
    return frames


def _http_get(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


# ---- render (a machine with Chromium) ----


def _read_recording(path: Path) -> Recording:
    data = pickle.loads(path.read_bytes())
    return Recording(data["capabilities"], [Frame(**f) for f in data["frames"]])


class Replay:
    """The recording at its own pace from the first call on, on this machine's clock: frame i is
    shown from `i` recorded seconds after the start; every snapshot's `taken_at` is moved onto
    this clock, so the throughput plot reads the recorded rates."""

    def __init__(self, recording: Recording) -> None:
        self.frames = recording.frames
        self.capabilities = recording.capabilities
        self._start: float | None = None
        self._lock = threading.Lock()

    def _offset(self) -> float:
        with self._lock:
            if self._start is None:
                self._start = time.monotonic()
            return self._start - self.frames[0].time

    def frame(self) -> Frame:
        now = time.monotonic() - self._offset()
        shown = [f for f in self.frames if f.time <= now]
        return shown[-1] if shown else self.frames[0]

    @property
    def finished(self) -> bool:
        return self._start is not None and self.frame() is self.frames[-1]

    def snapshot(self) -> Any:
        frame = self.frame()
        return dataclasses.replace(frame.snapshot,
                                   taken_at=frame.snapshot.taken_at + self._offset())


class _GpuReplay:
    def __init__(self, replay: Replay) -> None:
        self._replay = replay

    def sample(self) -> list:
        return self._replay.frame().gpus

    @property
    def status(self) -> str:
        return self._replay.frame().gpu_status

    def close(self) -> None:
        pass


class _HostReplay:
    def __init__(self, replay: Replay) -> None:
        self._replay = replay

    def sample(self) -> Any:
        return self._replay.frame().host


def render(args: argparse.Namespace) -> None:
    from playwright.sync_api import sync_playwright

    from hearth.appliance.routes import create_app
    from hearth.appliance.settings import Settings
    from hearth.ui.app import mount_ui
    from tests.fake_engine import FakeEngine

    replay = Replay(_read_recording(args.recording))
    settings = Settings(port=0)
    app = create_app(settings, FakeEngine)
    context = app.state.hearth
    context.engine.snapshot = replay.snapshot
    context.telemetry.gpu = _GpuReplay(replay)
    context.telemetry.host = _HostReplay(replay)
    context.auth.rows = lambda: replay.frame().key_rows
    context.serving.capabilities = lambda: replay.capabilities
    mount_ui(app, context)
    server, thread, port = _start(app)
    try:
        url = f"http://127.0.0.1:{port}"
        while True:
            try:
                _http_get(url + "/health")
                break
            except OSError:
                time.sleep(0.2)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium,
                                                 args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(60_000)
            page.goto(url)
            page.get_by_role("tab", name="Monitor").click()
            page.locator("#block-map .hearth-block-map").wait_for()
            while not replay.finished:
                time.sleep(0.5)
            page.wait_for_timeout(2500)  # two refreshes of the last frame
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
        print(f"wrote {args.out} ({len(replay.frames)} frames replayed)", file=sys.stderr)
    finally:
        server.should_exit = True
        thread.join(30)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    server_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="on the GPU machine; hearth serve flags after --")
    rec.add_argument("out", type=Path)
    rec.add_argument("--seconds", type=float, default=20.0)
    rec.add_argument("--concurrency", type=int, default=48)
    rec.add_argument("--request-rate", type=float, default=16.0, help="new requests a second")
    rec.add_argument("--num-prompts", type=int, default=2000)
    rec.add_argument("--input-len", type=int, default=512)
    rec.add_argument("--output-len", type=int, default=1024)
    rec.add_argument("--token-high", type=int, default=30000, help="prompt ids below this")
    ren = sub.add_parser("render", help="here, with Chromium")
    ren.add_argument("recording", type=Path)
    ren.add_argument("out", type=Path)
    ren.add_argument("--chromium", default=os.environ.get("HEARTH_CHROMIUM", "/usr/bin/chromium"))
    args = parser.parse_args(own)
    if args.command == "record":
        record(args, server_args)
    else:
        render(args)


if __name__ == "__main__":
    main()
