"""Per-key counters: Prometheus series with a `key` label (vLLM-style names) and the rows of the
monitor tab's keys table. Event-loop thread only (the gate feeds it)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from prometheus_client import CollectorRegistry, Counter, Gauge


@dataclass(frozen=True)
class KeyRow:
    """One key's totals since the start, for the monitor tab."""

    key: str
    num_requests: int = 0  # answered, any status
    num_rejected: int = 0  # 401/403/429 at the gate
    num_running: int = 0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0


class KeyStats:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._rows: dict[str, KeyRow] = {}
        self._requests = Counter("vllm:key_requests", "API calls answered, per key and status.",
                                 ["key", "status"], registry=registry)
        self._rejected = Counter("vllm:key_requests_rejected",
                                 "API calls refused at the gate (quota, endpoint, concurrency).",
                                 ["key", "reason"], registry=registry)
        self._prompt = Counter("vllm:key_prompt_tokens", "Prompt tokens, per key.", ["key"],
                               registry=registry)
        self._generation = Counter("vllm:key_generation_tokens", "Generated tokens, per key.",
                                   ["key"], registry=registry)
        self._running = Gauge("vllm:key_requests_running", "API calls in progress, per key.",
                              ["key"], registry=registry)

    def started(self, key: str) -> None:
        self._running.labels(key).inc()
        self._bump(key, num_running=1)

    def finished(self, key: str, status: int, num_prompt: int, num_generation: int) -> None:
        self._running.labels(key).dec()
        self._requests.labels(key, str(status)).inc()
        self._prompt.labels(key).inc(num_prompt)
        self._generation.labels(key).inc(num_generation)
        self._bump(key, num_running=-1, num_requests=1, num_prompt_tokens=num_prompt,
                   num_generation_tokens=num_generation)

    def rejected(self, key: str, status: int, reason: str) -> None:
        self._requests.labels(key, str(status)).inc()
        self._rejected.labels(key, reason).inc()
        self._bump(key, num_requests=1, num_rejected=1)

    def rows(self) -> list[KeyRow]:
        return [self._rows[k] for k in sorted(self._rows)]

    def _bump(self, key: str, **deltas: int) -> None:
        row = self._rows.get(key) or KeyRow(key)
        self._rows[key] = replace(row, **{k: getattr(row, k) + v for k, v in deltas.items()})
