"""The monitor tab: KV block map, cache and scheduler state, throughput, GPU and host, refreshed by
a `gr.Timer` about once a second while the tab is open.

Everything comes from `engine.snapshot()` (a copy taken under the engine's lock; taken on a worker
thread, since it may wait for the step in progress) and the telemetry samplers; never from /metrics.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd

from hearth.appliance.serving import AppContext, engine_gpu_indices
from hearth.ui.block_map import render_block_map
from hearth.ui.panels import (
    KEY_COLUMNS,
    SCHEDULER_COLUMNS,
    cache_summary,
    format_rate,
    gpu_panel,
    host_panel,
    key_rows,
    scheduler_rows,
    speculation_summary,
)
from hearth.ui.throughput import GENERATION, PROMPT, ThroughputHistory

logger = logging.getLogger("hearth.ui")

REFRESH_S = 1.0
LOADING = "*The model is loading…*"


class Readings:
    """What the monitor keeps between refreshes, shared by every browser session: the throughput
    history (fed by `sample_forever` while the server runs, so the plot has the last minutes when a
    monitor opens), and the last host sample. psutil's CPU % covers the time since its previous
    call, so two calls moments apart (two open monitors, a tab switch) would read ~0 %: readings
    closer than `min_interval_s` share one sample."""

    def __init__(self, telemetry: Any, min_interval_s: float = 0.5) -> None:
        self.history = ThroughputHistory()
        self._telemetry = telemetry
        self._min_interval_s = min_interval_s
        self._host: tuple[float, Any] | None = None  # (time.monotonic(), HostSample)
        self._lock = threading.Lock()

    def host(self) -> Any:
        with self._lock:
            now = time.monotonic()
            if self._host is None or now - self._host[0] >= self._min_interval_s:
                self._host = (now, self._telemetry.host.sample())
            return self._host[1]

    def record(self, snapshot: Any) -> None:
        self.history.record(
            snapshot.taken_at,
            snapshot.num_prompt_tokens_total,
            snapshot.num_generation_tokens_total,
        )

    async def sample_forever(self, engine: Any, interval_s: float = REFRESH_S) -> None:
        """Record the token counters every `interval_s` until cancelled (the app's lifespan)."""
        while True:
            try:
                snapshot = await asyncio.to_thread(engine.snapshot)
            except Exception:  # noqa: BLE001 - the plot stops; the server goes on
                logger.exception("throughput sampling stopped")
                return
            if snapshot is not None:
                self.record(snapshot)
            await asyncio.sleep(interval_s)


@dataclass
class MonitorView:
    """The tab's components, in the order `refresh` fills them."""

    header: Any
    block_map: Any
    summary: Any
    scheduler: Any
    throughput: Any
    gpu: Any
    host: Any
    keys: Any

    def outputs(self) -> list[Any]:
        return [
            self.header,
            self.block_map,
            self.summary,
            self.scheduler,
            self.throughput,
            self.gpu,
            self.host,
            self.keys,
        ]


def build_monitor_tab(context: AppContext, readings: Readings) -> gr.Timer:
    """The monitor's components; call inside a `gr.Tab`. Returns its (inactive) timer, which the
    app switches on while the tab is selected."""
    header = gr.Markdown(LOADING, elem_id="monitor-header")
    with gr.Row():
        with gr.Column(scale=3):
            gr.Markdown("### KV cache")
            block_map = gr.HTML(elem_id="block-map")
            summary = gr.Markdown(elem_id="cache-summary")
            gr.Markdown("### Scheduler")
            scheduler = gr.Dataframe(
                headers=SCHEDULER_COLUMNS,
                elem_id="scheduler-table",
                interactive=False,
                wrap=True,
            )
            gr.Markdown("### API keys")
            keys = gr.Dataframe(headers=KEY_COLUMNS, elem_id="keys-table", interactive=False)
        with gr.Column(scale=2):
            gr.Markdown("### Throughput")
            throughput = gr.LinePlot(
                x="seconds ago",
                y="tokens/s",
                color="kind",
                color_map={PROMPT: "#2563eb", GENERATION: "#d97706"},
                show_label=False,
                x_lim=[-readings.history.window_s, 0],
                elem_id="throughput-plot",
                height=260,
            )
            gr.Markdown("### GPU")
            gpu = gr.HTML(elem_id="gpu-panel")
            gr.Markdown("### Host")
            host = gr.HTML(elem_id="host-panel")
    view = MonitorView(header, block_map, summary, scheduler, throughput, gpu, host, keys)
    timer = gr.Timer(REFRESH_S, active=False)

    async def tick() -> list[Any]:
        try:
            return await refresh(context, readings)
        except Exception as error:  # noqa: BLE001 - say so in the tab, not in a toast each second
            logger.exception("monitor refresh failed")
            return [f"**Monitor error:** {type(error).__name__}: {error}"] + [gr.skip()] * 7

    timer.tick(tick, None, view.outputs(), show_progress="hidden", concurrency_limit=None)
    return timer


async def refresh(context: AppContext, readings: Readings) -> list[Any]:
    """Values for MonitorView.outputs(), from one engine snapshot and one telemetry sample."""
    snapshot = await asyncio.to_thread(context.engine.snapshot)
    history, gpus = readings.history, context.telemetry.gpu
    engine_gpus = [] if snapshot is None else engine_gpu_indices(
        snapshot.device, os.environ.get("CUDA_VISIBLE_DEVICES"))
    gpu = gpu_panel(gpus.sample(), gpus.status, engine_gpus)
    host = host_panel(readings.host())
    keys = pd.DataFrame(key_rows(context.auth.rows()), columns=KEY_COLUMNS)
    if snapshot is None:  # the engine is still loading
        return [LOADING, "", "", [], _plot(history), gpu, host, keys]
    readings.record(snapshot)
    scheduler = snapshot.scheduler
    seq_requests = {s.seq_id: s.request_id for s in scheduler.seqs}
    header = (
        f"**{snapshot.model_name}** on {snapshot.device} ({snapshot.dtype}), context "
        f"{snapshot.max_model_len} tokens, {', '.join(context.serving.capabilities())} · "
        f"running {scheduler.num_running} · waiting "
        f"{scheduler.num_waiting} · prompt {format_rate(history.latest(PROMPT))} · "
        f"generation {format_rate(history.latest(GENERATION))}"
        f"{speculation_summary(getattr(snapshot, 'spec_decode', None))}"
    )
    return [
        header,
        _block_maps(snapshot, seq_requests),
        _cache_summaries(snapshot),
        pd.DataFrame(scheduler_rows(scheduler.seqs), columns=SCHEDULER_COLUMNS),
        _plot(history),
        gpu,
        host,
        keys,
    ]


def _block_maps(snapshot: Any, seq_requests: dict[int, str]) -> str:
    """One block map, or one per data-parallel replica, each titled with its device."""
    if not snapshot.replicas:
        return render_block_map(snapshot.blocks, seq_requests)
    maps = []
    for index, replica in enumerate(snapshot.replicas):
        requests = {s.seq_id: s.request_id for s in replica.scheduler.seqs}
        maps.append(f'<div class="hearth-replica" data-replica="{index}"><b>replica {index} · '
                    f"{replica.device}</b>{render_block_map(replica.blocks, requests)}</div>")
    return "".join(maps)


def _cache_summaries(snapshot: Any) -> str:
    if not snapshot.replicas:
        return cache_summary(snapshot.blocks, snapshot.scheduler.num_preemptions)
    return "\n\n".join(
        f"**replica {i} · {r.device}** {cache_summary(r.blocks, r.scheduler.num_preemptions)}"
        for i, r in enumerate(snapshot.replicas))


def _plot(history: ThroughputHistory) -> pd.DataFrame:
    rates = history.rates(time.monotonic())
    return pd.DataFrame(
        {
            "seconds ago": [r.seconds_ago for r in rates],
            "tokens/s": [r.tokens_per_s for r in rates],
            "kind": [r.kind for r in rates],
        }
    )
