"""Security defaults for a server that every web page the user opens can reach.

- Host check (DNS-rebinding defence, the hole of Ollama's CVE-2024-28224): a page on evil.example
  whose name re-resolves to 127.0.0.1 sends `Host: evil.example`; only localhost names, the bound
  address (with a wildcard bind: this machine's addresses and names) and `--allowed-hosts` pass.
- Origin check: browsers send `Origin` on cross-site requests, even on "no-cors" POSTs that CORS
  never blocks from being sent. A request whose Origin is neither this server nor listed in
  `--allowed-origins` is refused, so a web page cannot make the model work for it.
- API key: `Authorization: Bearer KEY`, compared in constant time.
CORS headers themselves come from Starlette's CORSMiddleware, added only when origins are listed.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import psutil

from hearth.appliance.protocol import APIError

LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_WILDCARDS = ("0.0.0.0", "::", "")


def host_of(header: str) -> str:
    """'Example.COM:8000' -> 'example.com'; '[::1]:8000' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def allowed_host_names(bind_host: str, extra: Iterable[str]) -> frozenset[str] | None:
    """Host names the server answers to; None means any (`--allowed-hosts '*'`)."""
    extra = [host_of(h) for h in extra]
    if "*" in extra:
        return None
    names = set(LOCAL_NAMES) | set(extra) | {host_of(bind_host)}
    if bind_host in _WILDCARDS:
        names |= _this_machine_names()
    return frozenset(n for n in names if n)


def _this_machine_names() -> set[str]:
    names = {socket.gethostname().lower(), socket.getfqdn().lower()}
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family in (socket.AF_INET, socket.AF_INET6):
                names.add(address.address.split("%", 1)[0].lower())
    return names


def _is_local(name: str) -> bool:
    if name in LOCAL_NAMES or name.endswith(".localhost"):  # *.localhost never leaves the machine
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class HostOriginGuard:
    """ASGI middleware: refuse foreign Host and Origin headers with 403, before any route runs."""

    def __init__(self, app: Any, hosts: frozenset[str] | None, origins: Iterable[str]) -> None:
        self.app = app
        self._hosts = hosts
        self._origins = {o.rstrip("/").lower() for o in origins}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            reason = self._refusal(headers.get("host"), headers.get("origin"))
            if reason is not None:
                await _refuse(scope, send, reason)
                return
        await self.app(scope, receive, send)

    def _refusal(self, host: str | None, origin: str | None) -> str | None:
        if host is not None and self._hosts is not None:
            name = host_of(host)
            if not (name in self._hosts or _is_local(name)):
                return (
                    f"Host {host!r} is not allowed (DNS-rebinding defence); start the server "
                    f"with --allowed-hosts {name} to serve it"
                )
        if origin is not None:
            normalized = origin.rstrip("/").lower()
            same_origin = host is not None and urlsplit(normalized).netloc == host.lower()
            if not (same_origin or "*" in self._origins or normalized in self._origins):
                return (
                    f"Origin {origin!r} is not allowed; start the server with "
                    f"--allowed-origins {origin} to let that web page use it"
                )
        return None


async def _refuse(scope: dict, send: Any, reason: str) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    error = APIError(403, reason, type="forbidden", code="forbidden")
    ollama = scope.get("path", "").startswith("/api/")  # Ollama's error format there
    body = json.dumps({"error": reason} if ollama else error.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 403,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def check_api_key(authorization: str | None, api_key: str | None) -> None:
    """Raise 401 unless `authorization` is 'Bearer <api_key>' (no key configured: open)."""
    if api_key is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise APIError(
            401,
            "missing API key: send 'Authorization: Bearer <key>'",
            type="authentication_error",
            code="invalid_api_key",
        )
    if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(
            401, "incorrect API key provided", type="authentication_error", code="invalid_api_key"
        )
