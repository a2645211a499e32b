"""The UI through the real server with the default model, an API key and the UI mounted, over HTTP
and in headless Chromium (Playwright): login, streamed chat, the block map during a long
generation, Stop, errors, the GPU panel. One server and one browser page for the module; the tests
run in file order. The pure helpers are tested in test_ui_units.py.

HEARTH_UI_SCREENSHOTS=DIR also saves the chat and monitor screenshots there (docs/ui-*.png).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from server_harness import RunningServer, wait_healthy

from hearth.appliance.lifecycle import bind, make_server
from hearth.appliance.routes import create_app
from hearth.appliance.settings import Settings
from hearth.cli import engine_factory

gradio = pytest.importorskip("gradio")
# gradio's own queue code, not ours
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")

CHROMIUM = os.environ.get("HEARTH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]
API_KEY = "ui-test-key"
SCREENSHOTS = os.environ.get("HEARTH_UI_SCREENSHOTS")
LONG_GENERATION_S = 4.0  # how long the "long generation" should run, at the measured decode rate
measured = {"tokens_per_s": 10.0}  # updated by the first chat test (CI machines vary 30x)


# ---- the real server, with an API key: the UI is no way around it ----


@pytest.fixture(scope="module", params=[False, True], ids=["engine-thread", "engine-process"])
def server(request):
    """The UI over both: the engine on the server's thread, and in its own process (the monitor
    then reads its snapshots through the pipe)."""
    from hearth.ui.app import mount_ui

    # n-gram speculation on: greedy answers are unchanged, and the monitor shows its acceptance
    settings = Settings(port=0, api_key=API_KEY, max_num_seqs=4, speculative="ngram",
                        engine_process=request.param)
    sock = bind("127.0.0.1", 0)
    app = create_app(settings, engine_factory(settings))
    mount_ui(app, app.state.hearth)
    uvicorn_server = make_server(app, app.state.hearth, sock)
    thread = threading.Thread(target=uvicorn_server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    running = RunningServer(uvicorn_server.url, uvicorn_server, app.state.hearth, thread)
    try:
        wait_healthy(running, 300)
        yield running
    finally:
        uvicorn_server.should_exit = True
        thread.join(60)
        sock.close()


def test_ui_login_wants_the_api_key(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get("/config").status_code == 401
        page = client.get("/")
        assert page.status_code == 200 and "API key" in page.text  # the login page
        wrong = client.post("/login", data={"username": "me", "password": "nope"})
        assert wrong.status_code == 400
        assert client.get("/config").status_code == 401
        right = client.post("/login", data={"username": "me", "password": API_KEY})
        assert right.status_code == 200
        assert client.get("/config").status_code == 200
        # /v1 answers beside the UI and still wants the key itself, login cookie or not
        assert client.get("/v1/models").status_code == 401
        models = client.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
        assert models.status_code == 200


# ---- in the browser ----


def _no_browser(reason: str) -> None:
    """Skip on a developer's machine; fail where the browser tests must run (CI)."""
    if os.environ.get("HEARTH_REQUIRE_BROWSER") == "1":
        pytest.fail(f"browser tests required (HEARTH_REQUIRE_BROWSER=1), but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright import sync_api
    except ImportError:
        _no_browser("playwright is not installed (pip install playwright)")
    if not shutil.which(CHROMIUM):
        _no_browser(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser, server):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(60_000)
    page.goto(server.url)  # the login page; never wait for "networkidle" with Gradio
    page.get_by_label("username").fill("me")
    page.get_by_label("password").fill(API_KEY)
    page.get_by_role("button", name="Login").click()
    page.locator("#chat-input textarea").wait_for()
    return page


def _open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def _set_number(page, elem_id: str, value: float) -> None:
    box = page.locator(f"#{elem_id} input[data-testid=number-input]")
    box.fill(str(value))
    box.press("Tab")  # gradio takes the value on blur


# Every length the last reply's text takes, recorded in the page as the DOM changes: polling from
# here samples it and, on a busy machine, can miss a short answer's intermediate states.
_WATCH_REPLY = """() => {
    window.__replyLengths = [];
    const chat = document.querySelector('#chatbot');
    new MutationObserver(() => {
        const bots = chat.querySelectorAll('[data-testid=bot]');
        if (bots.length) window.__replyLengths.push(bots[bots.length - 1].innerText.length);
    }).observe(chat, {childList: true, subtree: true, characterData: true});
}"""


def _send(page, message: str, max_tokens: int, temperature: float = 0.0,
          watch: bool = False) -> None:
    _open_tab(page, "Chat")
    page.locator("#chat-clear").click()
    page.locator("#chatbot [data-testid=bot]").first.wait_for(state="detached")
    _set_number(page, "max-tokens", max_tokens)
    _set_number(page, "temperature", temperature)
    page.locator("#chat-input textarea").fill(message)
    if watch:
        page.evaluate(_WATCH_REPLY)
    page.locator("#chat-input textarea").press("Enter")


def _reply(page):
    return page.locator("#chatbot [data-testid=bot]").last


def _block_map_used(page) -> int:
    return int(page.locator("#block-map .hearth-block-map").get_attribute("data-num-used"))


def _screenshot(page, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / name), full_page=True)


def _wait_engine_idle(server, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        snap = server.context.engine.snapshot()
        if server.context.engine.num_in_flight == 0 and snap.scheduler.num_running == 0:
            return
        time.sleep(0.05)
    raise TimeoutError("the engine still has requests")


def test_chat_streams_an_answer(page, server):
    _send(page, "What is the capital of France?", max_tokens=24, watch=True)
    reply = _reply(page)
    lengths = set()
    deadline = time.monotonic() + 60
    while "tok/s" not in (text := reply.inner_text() if reply.count() else ""):
        assert time.monotonic() < deadline, f"no finished reply; last seen: {text!r}"
        lengths.add(len(text))
        time.sleep(0.03)
    answer, stats = text.rsplit("\n", 1)
    assert answer.strip(), "empty answer"
    lengths |= set(page.evaluate("window.__replyLengths"))
    assert len(lengths - {0}) >= 3, f"the answer did not stream: lengths seen {sorted(lengths)}"
    rate = re.search(r"TTFT [\d.]+ s · ([\d.]+) tok/s · (\d+) prompt tokens", stats)
    assert rate, stats
    measured["tokens_per_s"] = float(rate.group(1))

    # A second turn: the whole conversation goes to the model, its start from the prefix cache.
    page.locator("#chat-input textarea").fill("And of Germany?")
    page.locator("#chat-input textarea").press("Enter")
    page.wait_for_function(
        """() => {
            const bots = document.querySelectorAll('#chatbot [data-testid=bot]');
            return bots.length === 2 && bots[1].innerText.includes('tok/s');
        }"""
    )
    second = re.search(r"(\d+) prompt tokens \((\d+) cached\)", _reply(page).inner_text())
    assert int(second.group(1)) > int(rate.group(2)) + len(answer) // 8  # includes turn one
    assert int(second.group(2)) > 0
    _screenshot(page, "ui-chat.png")


def test_block_map_shows_a_long_generation_then_frees_it(page, server):
    max_tokens = int(min(256, max(24, measured["tokens_per_s"] * LONG_GENERATION_S)))
    _send(page, "Write a long story about a dragon who learns to bake bread.", max_tokens)
    _reply(page).wait_for()
    _open_tab(page, "Monitor")
    page.wait_for_function(  # the header advertises what /v1/models and /api/show list
        "() => document.querySelector('#monitor-header')?.innerText"
        ".includes('8192 tokens, completion, tools ·')"
    )
    block_map = page.locator("#block-map .hearth-block-map")
    page.wait_for_function(
        "() => +document.querySelector('#block-map .hearth-block-map')?.dataset.numUsed > 0"
    )
    assert page.locator("#block-map .cell.used").count() > 0
    assert "ui-" in page.locator("#scheduler-table").inner_text()  # the live request's row
    if SCREENSHOTS:
        page.wait_for_timeout(2500)  # the throughput plot draws from its second sample on
        _screenshot(page, "ui-monitor.png")
    page.wait_for_function(
        "() => document.querySelector('#block-map .hearth-block-map')?.dataset.numUsed === '0'",
        timeout=120_000,
    )
    assert block_map.locator(".cell.used").count() == 0
    assert block_map.locator(".cell.cached").count() > 0  # the finished prompt stays reusable
    _open_tab(page, "Chat")
    assert "tok/s" in _reply(page).inner_text()


def _json_output(page, on: bool, schema: str = "") -> None:
    box = page.locator("#json-output input[type=checkbox]")
    if box.is_checked() != on:
        box.click()
    page.locator("#json-schema textarea").fill(schema)


def test_json_output_toggle_gives_json_and_the_monitor_marks_it(page, server):
    rate = measured.get("tokens_per_s", 5.0)
    story = ('{"type": "object", "properties": {"story": {"type": "string", "minLength": 2000}}, '
             '"required": ["story"]}')  # runs to max_tokens: the monitor sees it running
    _open_tab(page, "Chat")
    _json_output(page, True, story)
    _send(page, "Tell me a long story.",
          max_tokens=int(min(256, max(24, rate * LONG_GENERATION_S))))
    _reply(page).wait_for()
    _open_tab(page, "Monitor")
    page.wait_for_function(
        "() => (document.querySelector('#scheduler-table')?.innerText || '').includes('{ }')")
    _open_tab(page, "Chat")
    page.wait_for_function("""() => {
        const bots = document.querySelectorAll('#chatbot [data-testid=bot]');
        return bots.length && bots[bots.length - 1].innerText.includes('tok/s');
    }""", timeout=120_000)
    assert _reply(page).inner_text().startswith('{"story": "')
    _json_output(page, True, '{"type": "object", "properties": {"capital": {"enum": '
                             '["Paris", "Lyon"]}}, "required": ["capital"], '
                             '"additionalProperties": false}')
    _send(page, "What is the capital of France?", max_tokens=24)
    page.wait_for_function("""() => {
        const bots = document.querySelectorAll('#chatbot [data-testid=bot]');
        return bots.length && bots[bots.length - 1].innerText.includes('tok/s');
    }""")
    answer = _reply(page).inner_text().rsplit("\n", 1)[0].strip()
    assert json.loads(answer)["capital"] in ("Paris", "Lyon")
    _json_output(page, True, "{not json")
    _send(page, "Hi", max_tokens=8)
    _reply(page).get_by_text("not valid JSON").wait_for()
    _json_output(page, False)


def test_stop_aborts_the_request_mid_stream(page, server):
    _send(page, "Count from 1 to 1000, separated by commas.", max_tokens=1000)
    reply = _reply(page)
    page.wait_for_function(
        "() => (document.querySelector('#chatbot [data-testid=bot]')?.innerText || '').trim()"
    )
    assert server.context.engine.num_in_flight == 1
    page.locator("#chat-stop").click()
    _wait_engine_idle(server, timeout_s=10)  # aborted: gone from the engine
    assert server.context.engine.snapshot().blocks.num_used == 0  # its blocks are free
    page.get_by_text("stopped").wait_for()
    stopped_text = reply.inner_text()
    assert "tok/s" in stopped_text
    time.sleep(1.0)
    assert reply.inner_text() == stopped_text  # nothing more streams in
    _open_tab(page, "Monitor")
    page.wait_for_function(
        "() => document.querySelector('#block-map .hearth-block-map')?.dataset.numUsed === '0'"
    )
    assert "ui-" not in page.locator("#scheduler-table").inner_text()


def test_too_long_a_message_is_an_error_in_the_chat(page, server):
    limit = server.context.engine.model.max_model_len
    _send(page, "hello " * (limit + 100), max_tokens=16)
    reply = _reply(page)
    reply.wait_for()
    text = reply.inner_text()
    assert "context length" in text and "Traceback" not in text
    assert server.context.engine.num_in_flight == 0


def test_gpu_and_host_panels(page, server):
    _open_tab(page, "Monitor")
    gpus = server.context.telemetry.gpu.sample()
    panel = page.locator("#gpu-panel")
    if gpus:
        panel.get_by_text(gpus[0].name).first.wait_for()
    else:
        panel.get_by_text("No NVIDIA GPU").wait_for()
        assert "runs on the CPU" in panel.inner_text()
    page.locator("#host-panel").get_by_text("process RSS").wait_for()


def test_monitor_shows_the_speculation_acceptance_rate(page, server):
    """The server speculates (n-gram): after an answer that copies its prompt, the monitor's
    header shows the acceptance rate, read from the engine snapshot through the serving layer."""
    phrase = "the quick brown fox jumps over the lazy dog"
    _send(page, f"Repeat exactly, three times: {phrase}. {phrase}.", max_tokens=40)
    page.wait_for_function(
        """() => {
            const bots = document.querySelectorAll('#chatbot [data-testid=bot]');
            return bots.length === 1 && bots[0].innerText.includes('tok/s');
        }"""
    )
    stats = server.context.engine.snapshot().spec_decode
    assert stats.num_draft_tokens > 0, stats
    _open_tab(page, "Monitor")
    page.wait_for_function(
        "() => document.querySelector('#monitor-header').innerText.includes('acceptance')")
    header = page.locator("#monitor-header").inner_text()
    k = 4 if "(float32)" in header else 3  # an unset K: 4 on the exact float32 path, else 3
    assert re.search(rf"speculative ngram \(K={k}\): acceptance \d+%", header), header


def test_monitor_shows_a_table_per_key(page, server):
    models = httpx.get(server.url + "v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    assert models.status_code == 200  # counted for the key "default" (--api-key)
    _open_tab(page, "Monitor")
    page.wait_for_function(
        "() => (document.querySelector('#keys-table')?.innerText || '').includes('default')")
