"""KeyGate: the ASGI middleware in front of the API routes. For each call to /v1, /api,
/tokenize or /detokenize it

    authenticates the key (keyring) ─► checks the key may call this endpoint (403)
    ─► takes a quota slot (429 + Retry-After) ─► runs the route with a CallRecord in context
    ─► when the response is sent: frees the slot, charges the tokens, counts, writes the audit line

The serving layer fills the CallRecord (fair-share flow, token counts); the route itself knows
nothing of keys. /health, /metrics, /version and the UI pass straight through: the UI's chat
opens and ends its calls itself through the same `admit` / `end` (ui/chat.py, Auth.open_ui_call).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from hearth.appliance.auth.audit import AuditLog, prompt_of
from hearth.appliance.auth.call import CallRecord, current_call
from hearth.appliance.auth.key_stats import KeyStats
from hearth.appliance.auth.keys import KeyEntry
from hearth.appliance.auth.quotas import QuotaExceededError, Quotas
from hearth.appliance.protocol import APIError

# Path -> endpoint group (keys.ENDPOINT_GROUPS); other guarded paths need a key but no group.
_GROUPS = {
    "/v1/chat/completions": "chat", "/api/chat": "chat",
    "/v1/completions": "completions", "/v1/fim/completions": "completions",
    "/api/generate": "completions",
    "/v1/models": "models", "/api/tags": "models", "/api/show": "models", "/api/ps": "models",
    "/tokenize": "tokenize", "/detokenize": "tokenize",
}
_OPEN = frozenset({"/api/version"})  # Ollama clients probe it before anything else
_MAX_PROMPT_BODY = 1 << 20  # --log-prompts keeps at most this much of a body


def guarded(path: str) -> bool:
    if path in _OPEN:
        return False
    return path in _GROUPS or path.startswith(("/v1/", "/api/"))


class KeyGate:
    def __init__(self, app: Any, auth: Any, model_name: Callable[[], str | None]) -> None:
        """`auth`: the server's Auth (auth/wiring.py): keyring, and the calls' admission and end."""
        self.app = app
        self._auth = auth
        self._model_name = model_name

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not guarded(path):
            await self.app(scope, receive, send)
            return
        call = CallRecord(None, endpoint=path, model=self._model_name())
        try:
            entry = await self._authenticate(scope)
            self._auth.admit(call, entry, _GROUPS.get(path))
        except APIError as error:
            await _send_error(scope, send, error)
            self._auth.log(call, error.status, scope.get("method"))
            return
        await self._run(scope, receive, send, call, entry)

    async def _authenticate(self, scope: dict) -> KeyEntry | None:
        headers = dict(scope["headers"])
        authorization = headers.get(b"authorization", b"").decode("latin-1") or None
        keyring = self._auth.keyring
        if keyring.keys_file is None:
            return keyring.authenticate(authorization)  # no hashes to check: fast
        # scrypt takes tens of milliseconds the first time a key is seen: not on the event loop.
        return await asyncio.to_thread(keyring.authenticate, authorization)

    async def _run(self, scope: dict, receive: Any, send: Any, call: CallRecord,
                   entry: KeyEntry | None) -> None:
        status = 500
        body = bytearray()
        audit = self._auth.audit
        keep_body = audit is not None and audit.log_prompts

        async def receive_and_keep() -> dict:
            message = await receive()
            if keep_body and len(body) < _MAX_PROMPT_BODY:
                body.extend(message.get("body", b""))
            return message

        async def send_and_watch(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        token = current_call.set(call)
        try:
            await self.app(scope, receive_and_keep, send_and_watch)
        finally:
            current_call.reset(token)
            self._auth.end(call, entry, status, scope.get("method"),
                           bytes(body) if keep_body else None)


def admit(quotas: Quotas, stats: KeyStats, call: CallRecord, entry: KeyEntry | None,
          group: str | None) -> None:
    """Open `call` under `entry` (None: no keys configured): the endpoint group check (403),
    a quota slot (429 with Retry-After), the key's counters. Raises APIError, counted."""
    if entry is None:
        return
    call.key, call.weight, call.priority = entry.name, entry.weight, entry.priority
    try:
        if group is not None and not entry.allows(group):
            raise APIError(403, f"API key {entry.name!r} may not call {call.endpoint} (allowed: "
                           f"{', '.join(sorted(entry.endpoints)) or 'nothing'})",
                           type="permission_error", code="endpoint_not_allowed")
        quotas.acquire(entry)
    except APIError as error:
        reason = error.reason if isinstance(error, QuotaExceededError) else "endpoint"
        stats.rejected(entry.name, error.status, reason)
        raise
    stats.started(entry.name)


def end(quotas: Quotas, stats: KeyStats, audit: AuditLog | None, call: CallRecord,
        entry: KeyEntry | None, status: int, method: str | None,
        body: bytes | None = None) -> None:
    """Close an admitted call: free its slot, charge its tokens, count it, write its audit line."""
    if entry is not None:
        quotas.release(entry, call.num_prompt_tokens + call.num_completion_tokens)
        stats.finished(entry.name, status, call.num_prompt_tokens, call.num_completion_tokens)
    log(audit, call, status, method, body)


def log(audit: AuditLog | None, call: CallRecord, status: int, method: str | None,
        body: bytes | None = None) -> None:
    if audit is None:
        return
    line: dict[str, Any] = {
        "key": call.key, "method": method, "endpoint": call.endpoint,
        "model": call.model, "status": status, "prompt_tokens": call.num_prompt_tokens,
        "completion_tokens": call.num_completion_tokens,
        "finish_reason": call.finish_reason,
        "latency_s": round(time.monotonic() - call.start, 4),
    }
    if body is not None:
        line["prompt"] = prompt_of(body)
    audit.write(line)


async def _send_error(scope: dict, send: Any, error: APIError) -> None:
    ollama = scope.get("path", "").startswith("/api/")  # Ollama's error format there
    body = json.dumps({"error": error.message} if ollama else error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
