"""The process around the app: uvicorn with Hearth's lifecycle.

start ─► engine loads (health 503) ─► ready: print the URL (health 200)
SIGTERM/SIGINT ─► drain: refuse new requests (503), let in-flight ones finish for
                  --shutdown-timeout seconds, abort the rest (their streams end cleanly) ─► exit 0
second signal ─► stop now
SIGHUP ─► reload the API keys file (--api-keys-file); requests in flight are not touched
engine thread dies ─► health 503, in-flight requests fail 503 ─► exit 1 (systemd restarts us)
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from types import FrameType
from typing import Any

import uvicorn

from hearth.appliance.serving.context import AppContext

logger = logging.getLogger("hearth")

EXIT_ENGINE_DIED = 1


class HearthServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, context: AppContext, url: str) -> None:
        super().__init__(config)
        self.context = context
        self.url = url
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        watcher = asyncio.ensure_future(self._watch_engine())
        reloads = self._handle_sighup()
        try:
            await super().serve(sockets)
        finally:
            watcher.cancel()
            if reloads:
                self._loop.remove_signal_handler(signal.SIGHUP)

    def _handle_sighup(self) -> bool:
        """SIGHUP (`systemctl reload`) reloads the keys file, and never stops the server: its
        default action would. Main thread only: a test's server thread cannot take signals."""
        try:
            self._loop.add_signal_handler(signal.SIGHUP, self._reload_keys)
        except (RuntimeError, ValueError, NotImplementedError):
            return False
        return True

    def _reload_keys(self) -> None:
        if self.context.settings.api_keys_file is None:
            logger.info("SIGHUP: no --api-keys-file, nothing to reload")
            return
        logger.info("SIGHUP: reloading the API keys file")
        asyncio.ensure_future(asyncio.to_thread(self.context.auth.reload_keys))

    async def _watch_engine(self) -> None:
        engine = self.context.engine
        if await engine.wait_loaded():
            print(f"Hearth is ready: {self.url}  (OpenAI API: {self.url}v1)", flush=True)
            await engine.wait_dead()
            logger.error("the engine died; exiting with status %d", EXIT_ENGINE_DIED)
        self.exit_code = EXIT_ENGINE_DIED
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not uvicorn's: it re-raises the signal after shutting down, so the exit status would be
        # "killed by SIGTERM" instead of 0.
        if self._draining or self._loop is None:
            self.should_exit = True
            self.force_exit = True
            return
        self._draining = True
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain(sig)))

    async def _drain(self, sig: int) -> None:
        timeout = self.context.settings.shutdown_timeout
        logger.info(
            "%s: finishing in-flight requests (up to %.0f s), then exiting",
            signal.Signals(sig).name,
            timeout,
        )
        await self.context.engine.drain(timeout)
        self.should_exit = True


def make_server(app: Any, context: AppContext, sock: socket.socket) -> HearthServer:
    settings = context.settings
    host, port = sock.getsockname()[:2]
    shown = host if ":" not in host else f"[{host}]"
    scheme = "https" if settings.ssl_certfile else "http"
    url = f"{scheme}://{'127.0.0.1' if host in ('0.0.0.0', '::') else shown}:{port}/"
    # uvicorn's own info lines ("Uvicorn running on ...") would print before the model is
    # loaded; we print the URL once it is ready instead.
    log_level = "debug" if settings.log_level == "debug" else "warning"
    config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=5,
        lifespan="on",
        ssl_certfile=settings.ssl_certfile,  # checked when the settings were made (tls.py)
        ssl_keyfile=settings.ssl_keyfile,
    )
    if settings.access_log:
        logging.getLogger("uvicorn.access").setLevel(logging.INFO)
    return HearthServer(config, context, url)


def run(app: Any, context: AppContext, sock: socket.socket) -> int:
    """Serve on `sock` until a signal or an engine failure; the process exit status."""
    server = make_server(app, context, sock)
    server.run(sockets=[sock])
    return server.exit_code


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now so that `--port 0` can print the port it got."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        sys.exit(f"error: cannot listen on {host}:{port}: {error.strerror}")
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
