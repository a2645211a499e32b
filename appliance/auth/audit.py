"""The audit log: one JSON line per API call, under the state directory, rotated by size.

    {"time": "2026-12-05T18:40:01.123Z", "key": "kiosk", "method": "POST",
     "endpoint": "/v1/chat/completions", "model": "smollm2", "status": 200,
     "prompt_tokens": 41, "completion_tokens": 12, "finish_reason": "stop", "latency_s": 0.412}

The prompt text is never written unless `--log-prompts` is set (then the request body's `prompt`
or `messages` go in as "prompt"). Writing happens on a logging QueueListener's own thread: the
event loop only enqueues, and the engine thread never sees the log. A full disk or unwritable file
is reported by the logging module and never fails a request.
"""

from __future__ import annotations

import datetime
import json
import logging
import logging.handlers
import queue
from pathlib import Path
from typing import Any

AUDIT_FILE = "audit.jsonl"
NUM_BACKUPS = 5


class AuditLog:
    def __init__(self, directory: str | Path, max_bytes: int, log_prompts: bool = False) -> None:
        self.path = Path(directory) / AUDIT_FILE
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.handlers.RotatingFileHandler(
                self.path, maxBytes=max_bytes, backupCount=NUM_BACKUPS, encoding="utf-8"
            )
        except OSError as error:
            raise ValueError(f"cannot write the audit log {self.path}: {error.strerror}; "
                             "check --state-dir and its permissions") from None
        handler.setFormatter(logging.Formatter("%(message)s"))
        self.log_prompts = log_prompts
        self._handler = handler
        self._queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._listener = logging.handlers.QueueListener(self._queue, handler)
        self._listener.start()

    def write(self, entry: dict[str, Any]) -> None:
        """Queue one line (never blocks on the disk)."""
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
        line = json.dumps({"time": now.replace("+00:00", "Z"), **entry}, ensure_ascii=False)
        self._queue.put(logging.makeLogRecord({"msg": line, "levelno": logging.INFO,
                                               "levelname": "INFO"}))

    def flush(self) -> None:
        """Wait until every queued line is on disk (tests, shutdown)."""
        self._listener.stop()  # drains the queue
        self._listener.start()

    def close(self) -> None:
        """Write what is queued and close the file."""
        self._listener.stop()
        self._handler.close()


def prompt_of(body: bytes) -> Any:
    """The `prompt` / `messages` / `suffix` of a JSON request body, for `--log-prompts`."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    return {k: data[k] for k in ("messages", "prompt", "suffix", "input") if k in data} or None
