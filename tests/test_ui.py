"""The UI. Its pure helpers (block map, throughput, conversation, panels) without a browser; then
the real server with the default model, an API key and the UI mounted, over HTTP and in headless
Chromium (Playwright): login, streamed chat, the block map during a long generation, Stop, errors,
the GPU panel. One server and one browser page for the module; the tests run in file order.

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
from types import SimpleNamespace

import httpx
import pytest
from server_harness import RunningServer, wait_healthy

from hearth.appliance.lifecycle import bind, make_server
from hearth.appliance.routes import create_app
from hearth.appliance.settings import Settings
from hearth.appliance.telemetry import NO_GPU, GpuSample, HostSample
from hearth.cli import engine_factory
from hearth.engine.block_manager import BlockSnapshot
from hearth.ui.block_map import (
    CACHED_COLOUR,
    FREE_COLOUR,
    SHARED,
    SHARED_COLOUR,
    block_owners,
    group_cells,
    render_block_map,
    request_colour,
)
from hearth.ui.chat import ChatOptions, response_format
from hearth.ui.conversation import (
    STOPPED,
    ReplyStats,
    Turn,
    display_messages,
    format_stats,
    mark_stopped,
    model_messages,
)
from hearth.ui.panels import (
    GRAMMAR_MARK,
    cache_summary,
    format_bytes,
    gpu_panel,
    hit_rate,
    host_panel,
    key_rows,
    scheduler_rows,
)
from hearth.ui.throughput import GENERATION, PROMPT, ThroughputHistory

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


def snapshot(owners, cached=None, block_size=16, queries=0, hits=0) -> BlockSnapshot:
    cached = cached or [False] * len(owners)
    num_used = sum(o is not None for o in owners)
    return BlockSnapshot(
        num_blocks=len(owners),
        block_size=block_size,
        num_free=len(owners) - num_used,
        num_used=num_used,
        num_cached=sum(cached),
        block_owner=tuple(owners),
        block_cached=tuple(cached),
        prefix_queries_tokens=queries,
        prefix_hits_tokens=hits,
        usage=num_used / len(owners),
    )


# ---- block map ----


def test_block_owners_map_seqs_to_requests_and_mark_shared_blocks():
    snap = snapshot([None, (1,), (1, 2), (1, 3), (4,)])
    owners = block_owners(snap, {1: "a", 2: "a", 3: "b"})
    # seqs 1 and 2 are two samples of request a; seq 4 is unknown to the scheduler snapshot
    assert owners == [None, "a", "a", SHARED, "seq 4"]


def test_one_cell_per_block_when_few_blocks():
    snap = snapshot([None, (1,), None, None], cached=[False, False, True, False])
    cells = group_cells(snap, {1: "req-1"}, max_cells=8)
    assert [c.state for c in cells] == ["free", "used", "cached", "free"]
    assert [c.num_blocks for c in cells] == [1, 1, 1, 1]
    assert cells[1].owner == "req-1"


def test_many_blocks_are_grouped_and_a_group_takes_its_majority_owner():
    owners = [(1,), (2,), (2,), None, None, None, None]  # 7 blocks, at most 3 cells: 3 per cell
    cells = group_cells(snapshot(owners), {1: "x", 2: "y"}, max_cells=3)
    assert [c.num_blocks for c in cells] == [3, 3, 1]
    assert (cells[0].num_used, cells[0].owner) == (3, "y")
    assert cells[1].state == "free" and cells[2].state == "free"
    with pytest.raises(ValueError, match="max_cells"):
        group_cells(snapshot(owners), {}, max_cells=0)


def test_rendered_map_carries_counts_colours_and_escaped_titles():
    request = '<img src=x onerror="alert(1)">'
    snap = snapshot([(7,), (7, 8), None, None], cached=[False, False, True, False])
    page = render_block_map(snap, {7: request, 8: "other"})
    assert 'data-num-blocks="4" data-num-used="2" data-num-cached="1"' in page
    cells = re.findall(r'<span class="cell (\w+)" style="background:(#\w+)"', page)
    assert cells == [
        ("used", request_colour(request)),
        ("used", SHARED_COLOUR),
        ("cached", CACHED_COLOUR),
        ("free", FREE_COLOUR),
    ]
    assert "<img" not in page and "&lt;img" in page
    assert "one block per cell" in page and "cached, reusable (1)" in page


def test_request_colour_is_stable():
    assert request_colour("chatcmpl-1") == request_colour("chatcmpl-1")


# ---- throughput ----


def test_throughput_rates_between_samples():
    history = ThroughputHistory(window_s=60, min_interval_s=0.5)
    history.record(100.0, 0, 0)
    history.record(100.2, 999, 999)  # too close to the previous sample: skipped
    history.record(102.0, 400, 50)
    history.record(103.0, 400, 80)
    rates = history.rates(now=103.0)
    assert [(r.seconds_ago, r.kind, r.tokens_per_s) for r in rates] == [
        (-1.0, PROMPT, 200.0),
        (-1.0, GENERATION, 25.0),
        (0.0, PROMPT, 0.0),
        (0.0, GENERATION, 30.0),
    ]
    assert history.latest(GENERATION) == 30.0


def test_throughput_forgets_samples_outside_the_window():
    history = ThroughputHistory(window_s=10, min_interval_s=0)
    for t in range(30):
        history.record(float(t), t * 10, t)
    assert len(history.rates(now=29.0)) == 2 * 10
    assert ThroughputHistory().latest(PROMPT) is None


# ---- conversation ----


def test_stats_line():
    stats = ReplyStats(40, 32, 11, ttft_s=0.25, decode_s=0.5, finish_reason="length")
    assert stats.tokens_per_s == 20.0
    line = format_stats(stats)
    assert line == (
        "TTFT 0.25 s · 20.0 tok/s · 40 prompt tokens (32 cached) · 11 generated · hit max tokens"
    )
    assert "n/a tok/s" in format_stats(ReplyStats(5, 0, 1, 0.1, None, "stop"))
    assert format_stats(ReplyStats(5, 0, 0, None, None, "abort")).endswith("aborted by the server")


def test_display_shows_stats_and_errors_but_the_model_sees_neither():
    done = ReplyStats(10, 0, 3, 0.1, 0.2, "stop")
    turns = [
        Turn("user", "hi"),
        Turn("assistant", "Hello!", done),
        Turn("user", "x" * 10),
        Turn("assistant", "the chat prompt has 9000 tokens", error=True),
        Turn("user", "and now?"),
    ]
    shown = display_messages(turns)
    assert shown[1]["content"].startswith("Hello!\n\n*TTFT 0.10 s")
    assert shown[3]["content"].startswith("⚠️ the chat prompt")
    assert model_messages("Be brief.", turns) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "and now?"},
    ]
    assert model_messages("  ", turns[:1]) == [{"role": "user", "content": "hi"}]


def test_stop_marks_only_a_reply_still_streaming():
    streaming = [
        Turn("user", "q"),
        Turn("assistant", "partial", ReplyStats(5, 0, 2, 0.1, 0.1, None)),
    ]
    stopped = mark_stopped(streaming)
    assert stopped[-1].stats.finish_reason == STOPPED
    assert "stopped" in display_messages(stopped)[-1]["content"]
    finished = [Turn("user", "q"), Turn("assistant", "a", ReplyStats(5, 0, 1, 0.1, None, "stop"))]
    assert mark_stopped(finished) == finished
    assert mark_stopped([Turn("user", "q")]) == [Turn("user", "q")]


# ---- panels ----


def test_format_bytes():
    assert [format_bytes(x) for x in (512, 2048, 3 * 2**20, 80 * 2**30, 2**50)] == [
        "512 B",
        "2.0 KiB",
        "3.0 MiB",
        "80.0 GiB",
        "1048576.0 GiB",
    ]
    assert format_bytes(None) == "n/a"


def test_scheduler_rows_mark_constrained_requests():
    from hearth.engine.scheduler import SeqSnapshot

    seqs = [SeqSnapshot(0, "chatcmpl-a", "decode", 5, 2, 7, 1, 1.25, constrained=True),
            SeqSnapshot(1, "ui-b", "waiting", 3, 0, 0, 0, 0.5)]
    assert [row[:3] for row in scheduler_rows(seqs)] == [
        ["chatcmpl-a", "decode", GRAMMAR_MARK], ["ui-b", "waiting", ""]]


def test_key_rows():
    row = SimpleNamespace(key="kiosk", num_requests=5, num_rejected=2, num_running=1,
                          num_prompt_tokens=40, num_generation_tokens=12)
    assert key_rows([row]) == [["kiosk", 5, 2, 1, 40, 12]]


def test_json_toggle_becomes_response_format():
    def options(on, schema=""):
        return ChatOptions("", 0.7, 0.95, 64, json_output=on, json_schema=schema)

    assert response_format(options(False, '{"type": "object"}')) is None
    assert response_format(options(True)) == {"type": "json_object"}
    assert response_format(options(True, '{"type": "object"}')) == {
        "type": "json_schema", "json_schema": {"name": "ui", "schema": {"type": "object"}}}
    with pytest.raises(Exception, match="not valid JSON"):
        response_format(options(True, "{oops"))


def test_cache_summary_and_hit_rate():
    snap = snapshot([(1,), None, None, None], queries=200, hits=50)
    assert hit_rate(snap) == 0.25
    assert hit_rate(snapshot([None])) is None
    line = cache_summary(snap, num_preemptions=3)
    assert "25.0% used" in line and "hit rate 25%" in line and "preemptions 3" in line


def test_gpu_panel_without_and_with_gpus():
    assert "No NVIDIA GPU</b>" in gpu_panel([], NO_GPU)
    sample = GpuSample(0, "NVIDIA H100 80GB HBM3", 0.87, 40 * 2**30, 80 * 2**30, 61.0, None)
    page = gpu_panel([sample, sample], "2 NVIDIA GPU(s)")
    assert 'data-num-gpus="2"' in page and page.count("GPU 0: NVIDIA H100") == 2
    assert "87%" in page and "40.0 GiB / 80.0 GiB (50%)" in page and "61 °C" in page
    assert "n/a" in page  # power not reported


def test_host_panel():
    page = host_panel(HostSample(0.5, 6 * 2**30, 24 * 2**30, 700 * 2**20))
    assert "50% (all cores)" in page and "6.0 GiB / 24.0 GiB (25%)" in page
    assert "700.0 MiB" in page


# ---- the real server, with an API key: the UI is no way around it ----


@pytest.fixture(scope="module")
def server():
    from hearth.ui.app import mount_ui

    # n-gram speculation on: greedy answers are unchanged, and the monitor shows its acceptance
    settings = Settings(port=0, api_key=API_KEY, max_num_seqs=4, speculative="ngram")
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


def _send(page, message: str, max_tokens: int, temperature: float = 0.0) -> None:
    _open_tab(page, "Chat")
    page.locator("#chat-clear").click()
    page.locator("#chatbot [data-testid=bot]").first.wait_for(state="detached")
    _set_number(page, "max-tokens", max_tokens)
    _set_number(page, "temperature", temperature)
    page.locator("#chat-input textarea").fill(message)
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
    _send(page, "What is the capital of France?", max_tokens=24)
    reply = _reply(page)
    lengths = set()
    deadline = time.monotonic() + 60
    while "tok/s" not in (text := reply.inner_text() if reply.count() else ""):
        assert time.monotonic() < deadline, f"no finished reply; last seen: {text!r}"
        lengths.add(len(text))
        time.sleep(0.03)
    answer, stats = text.rsplit("\n", 1)
    assert answer.strip(), "empty answer"
    assert len(lengths - {0}) >= 2, f"the answer did not stream: lengths seen {sorted(lengths)}"
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
    _send(page, "Tell me a long story.", max_tokens=int(min(96, max(24, rate * 4))))
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
    assert re.search(r"speculative ngram \(K=4\): acceptance \d+%", header), header


def test_monitor_shows_a_table_per_key(page, server):
    models = httpx.get(server.url + "v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    assert models.status_code == 200  # counted for the key "default" (--api-key)
    _open_tab(page, "Monitor")
    page.wait_for_function(
        "() => (document.querySelector('#keys-table')?.innerText || '').includes('default')")
