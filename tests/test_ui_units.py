"""The UI's pure helpers without a server or a browser: the block map, throughput history,
conversation (what is shown vs what the model sees) and the monitor panels. The real server and
headless Chromium are in test_ui.py."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from hearth.appliance.telemetry import NO_GPU, GpuSample, HostSample
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


def _seq_blocks(owners) -> tuple:
    """Per-block holder tuples → (seq id, its blocks), the form a BlockSnapshot keeps."""
    blocks: dict[int, list[int]] = {}
    for block_id, holders in enumerate(owners):
        for seq_id in holders or ():
            blocks.setdefault(seq_id, []).append(block_id)
    return tuple((seq_id, tuple(ids)) for seq_id, ids in blocks.items())


def snapshot(owners, cached=None, block_size=16, queries=0, hits=0) -> BlockSnapshot:
    cached = cached or [False] * len(owners)
    num_used = sum(o is not None for o in owners)
    return BlockSnapshot(
        num_blocks=len(owners),
        block_size=block_size,
        num_free=len(owners) - num_used,
        num_used=num_used,
        num_cached=sum(cached),
        seq_blocks=_seq_blocks(owners),
        cached_block_ids=tuple(i for i, c in enumerate(cached) if c),
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
