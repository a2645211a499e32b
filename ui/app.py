"""The browser UI: a Gradio Blocks app (chat tab, monitor tab) mounted at / of the server's FastAPI
app, in the same process and on the same port as /v1. `hearth.cli` imports this module lazily
(`hearth serve --no-ui` never pays gradio's import).

With an API key set, the UI asks for it at a login page (any user name, the key as the password):
the UI must not be a way around the key. Nothing is fetched from the internet: no analytics, and
system fonts instead of Google Fonts, for air-gapped sites.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import gradio as gr  # noqa: E402
from fastapi import FastAPI  # noqa: E402

from hearth.appliance.serving import AppContext  # noqa: E402
from hearth.ui.block_map import CSS as BLOCK_MAP_CSS  # noqa: E402
from hearth.ui.chat import build_chat_tab  # noqa: E402
from hearth.ui.monitor import Readings, build_monitor_tab  # noqa: E402

SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "sans-serif")
MONO_FONTS = ("ui-monospace", "monospace")
CSS = (
    BLOCK_MAP_CSS
    + """
.hearth-gpu table, .hearth-host table { font-size: 13px; }
.hearth-gpu *, .hearth-host * { border: none !important; }
.hearth-gpu td, .hearth-host td { padding: 1px 12px 1px 0; }
"""
)


def build_ui(context: AppContext, readings: Readings) -> gr.Blocks:
    with gr.Blocks(title="Hearth", analytics_enabled=False) as blocks:
        with gr.Tabs():
            with gr.Tab("Chat", id="chat") as chat_tab:
                build_chat_tab(context)
            with gr.Tab("Monitor", id="monitor") as monitor_tab:
                timer = build_monitor_tab(context, readings)
        # The monitor refreshes only while someone looks at it.
        monitor_tab.select(lambda: gr.Timer(active=True), None, timer, queue=False)
        chat_tab.select(lambda: gr.Timer(active=False), None, timer, queue=False)
    return blocks


def mount_ui(app: FastAPI, context: AppContext) -> FastAPI:
    """Mount the UI at / (the routes added before it, /v1 and the rest, still match first), and
    sample the throughput for the monitor while the app runs."""
    readings = Readings(context.telemetry)
    _sample_during_lifespan(app, readings, context)
    theme = gr.themes.Soft(font=SYSTEM_FONTS, font_mono=MONO_FONTS)
    return gr.mount_gradio_app(
        app,
        build_ui(context, readings),
        path="/",
        auth=_key_check(context),
        auth_message="This server has an API key: enter it as the password (any user name).",
        footer_links=[],
        theme=theme,
        css=CSS,
        ssr_mode=False,
        mcp_server=False,
        run_history=False,
    )


def _sample_during_lifespan(app: FastAPI, readings: Readings, context: AppContext) -> None:
    outer = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
        async with outer(app) as state:
            sampler = asyncio.ensure_future(readings.sample_forever(context.engine))
            try:
                yield state
            finally:
                sampler.cancel()

    app.router.lifespan_context = lifespan


def _key_check(context: AppContext):  # noqa: ANN202 - gradio's auth callable, or None: no login
    """Any key the API accepts logs in; with a keys file, the user name is the key's name
    ("default" for --api-key): the session's chats are charged to that key (auth/wiring.py)."""
    if not context.auth.requires_key:
        return None
    return lambda username, password: context.auth.login(username, password)
