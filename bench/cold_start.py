"""Cold start of `hearth serve`: seconds from exec to /health 200, to the first streamed token of a
chat request, and (with the UI) to the UI's page at /.

Each run is a fresh process (the OS page cache stays warm: the systemd-restart case). With
`--baseline REF` the same runs are made, alternating, on a git worktree of REF (e.g. the commit
before a start-up change), in this same venv, so both sides share the machine's state.

    python bench/cold_start.py [--runs 3] [--baseline e988f6a] [-- extra serve flags]

On a GPU, with a model directory that has weights but no tokenizer (bench/make_weights.py):

    python bench/cold_start.py --device cuda --api-only --prompt-ids -- --model DIR

Each run prints the server's own account of the start (`built ... in ...`: the phases).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_LOG_KEYS = (" built ", "ready in", "captured", "Traceback", " ERROR ")  # the server's phases


def _launcher(package_parent: Path | None) -> list[str]:
    """`hearth serve` from this checkout, or from the directory holding a `hearth` link to another
    (a sys.path entry wins over the editable install's finder)."""
    if package_parent is None:
        return [sys.executable, "-m", "hearth"]
    code = (f"import sys; sys.path.insert(0, {str(package_parent)!r}); "
            "from hearth.cli import main; sys.exit(main())")
    return [sys.executable, "-c", code]


def _get(url: str, timeout: float = 5) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except Exception:  # noqa: BLE001 - not up yet
        return None


def _first_token_request(base: str, model: str, prompt_ids: bool) -> urllib.request.Request:
    """A streamed 4-token request: chat, or a completion from token ids where the model directory
    has no tokenizer (dummy weights)."""
    if prompt_ids:
        url, body = "v1/completions", {"model": model, "prompt": [1, 2, 3, 4], "max_tokens": 4,
                                       "stream": True}
    else:
        url, body = "v1/chat/completions", {"model": model, "max_tokens": 4, "stream": True,
                                            "messages": [{"role": "user", "content": "Hi"}]}
    return urllib.request.Request(base + url, data=json.dumps(body).encode(),
                                  headers={"Content-Type": "application/json"})


def one_run(launcher: list[str], ui: bool, port: int, extra: list[str], device: str = "cpu",
            prompt_ids: bool = False) -> dict:
    args = [*launcher, "serve", "--port", str(port), "--device", device, *extra]
    if not ui:
        args.append("--no-ui")
    base = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = tempfile.TemporaryFile()
    t0 = time.perf_counter()
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, env=env)
    try:
        while _get(base + "health", 1) is None:
            if process.poll() is not None:
                raise RuntimeError(f"`{' '.join(args)}` exited with {process.returncode}")
            time.sleep(0.02)
        health = time.perf_counter() - t0
        model = json.loads(_get(base + "v1/models"))["data"][0]["id"]
        request = _first_token_request(base, model, prompt_ids)
        first = None
        with urllib.request.urlopen(request, timeout=120) as response:
            for line in response:
                if b'"content"' in line or b'"text"' in line:
                    first = time.perf_counter() - t0
                    break
        page = None
        if ui:
            while (html := _get(base, 5)) is None or b"gradio" not in html.lower():
                time.sleep(0.05)
            page = time.perf_counter() - t0
        return {"health_s": health, "first_token_s": first, "ui_page_s": page}
    finally:
        process.terminate()
        process.wait(60)
        log.seek(0)
        for line in log.read().decode(errors="replace").splitlines():
            if any(key in line for key in _LOG_KEYS):
                print("  server:", line.strip()[-400:], flush=True)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline", help="a git ref to time beside this checkout")
    parser.add_argument("--port", type=int, default=8771)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--device", default="cpu", help="`hearth serve --device` (cpu, cuda)")
    parser.add_argument("--api-only", action="store_true", help="skip the runs with the UI")
    parser.add_argument("--prompt-ids", action="store_true",
                        help="first token from a token-id completion (a model without tokenizer)")
    parser.add_argument("extra", nargs="*", help="more `hearth serve` flags (after --)")
    args = parser.parse_args()
    sides: dict[str, list[str]] = {"this checkout": _launcher(None)}
    tmp = None
    if args.baseline:
        tmp = Path(tempfile.mkdtemp(prefix="hearth-baseline-"))
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tmp / "hearth"),
                        args.baseline], check=True, capture_output=True)
        sides[f"baseline {args.baseline}"] = _launcher(tmp)
    results: dict[str, dict[str, list[dict]]] = {s: {"api only": [], "with UI": []} for s in sides}
    try:
        for _ in range(args.runs):
            for side, launcher in sides.items():
                for mode in ("api only",) if args.api_only else ("api only", "with UI"):
                    run = one_run(launcher, mode == "with UI", args.port, args.extra,
                                  args.device, args.prompt_ids)
                    results[side][mode].append(run)
                    print(side, mode, {k: v and round(v, 2) for k, v in run.items()}, flush=True)
    finally:
        if tmp is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(tmp / "hearth")], check=False)
    print("\n| side | mode | /health s | first token s | UI page s |\n|---|---|---|---|---|")
    for side, modes in results.items():
        for mode, runs in modes.items():
            cells = []
            for key in ("health_s", "first_token_s", "ui_page_s"):
                values = [r[key] for r in runs if r[key] is not None]
                cells.append(f"{statistics.median(values):.2f}" if values else "—")
            print(f"| {side} | {mode} | {' | '.join(cells)} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
