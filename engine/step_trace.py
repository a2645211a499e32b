"""StepTrace: when and how full each engine step ran, for benchmarks that compare serving paths.

`HEARTH_STEP_TRACE=PREFIX` in the environment makes every LLMEngine of the process record, per
step: its start and end (monotonic), the sequences running after it and the tokens it produced.
At shutdown (or exit) the engine writes `PREFIX.<pid>.json`: a summary (steps, time inside and
between steps, mean batch, tokens per step, the share of wall time spent below a full batch) and
the raw columns. bench/served.py uses it to tell apart "the served engine runs fewer sequences a
step" from "its steps cost more" from "it waits between steps" (W7, issue 18). Off: nothing is
recorded and the step pays one attribute check.
"""

from __future__ import annotations

import atexit
import json
import os
import time
from array import array
from pathlib import Path


class StepTrace:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._start = array("d")
        self._end = array("d")
        self._running = array("l")
        self._tokens = array("l")
        self._batched = array("l")  # tokens the step's forward computed (prompt chunks included)
        self._chunks = array("l")  # sequences in that forward
        self._scheduled = (0, 0)
        self._written = False
        atexit.register(self.write)

    @classmethod
    def from_env(cls) -> StepTrace | None:
        prefix = os.environ.get("HEARTH_STEP_TRACE")
        return cls(Path(f"{prefix}.{os.getpid()}.json")) if prefix else None

    def scheduled(self, num_batched_tokens: int, num_chunks: int) -> None:
        """The forward this step launches (with async scheduling, the next step's)."""
        self._scheduled = (num_batched_tokens, num_chunks)

    def record(self, start: float, num_running: int, num_tokens: int) -> None:
        self._batched.append(self._scheduled[0])
        self._chunks.append(self._scheduled[1])
        self._scheduled = (0, 0)
        self._start.append(start)
        self._end.append(time.monotonic())
        self._running.append(num_running)
        self._tokens.append(num_tokens)

    def columns(self) -> dict:
        return {"start": list(self._start), "end": list(self._end),
                "running": list(self._running), "tokens": list(self._tokens),
                "batched": list(self._batched), "chunks": list(self._chunks)}

    def write(self, full_batch: int | None = None) -> None:
        if self._written:
            return
        self._written = True
        columns = self.columns()
        self.path.write_text(json.dumps({"summary": summarize(columns, full_batch=full_batch),
                                         **columns}))


def summarize(columns: dict, window: tuple[float, float] | None = None,
              full_batch: int | None = None) -> dict:
    """Totals over the steps that started inside `window` (monotonic seconds; all if None):
    wall time from the first step's start to the last one's end, time inside and between
    steps, mean batch and tokens per step, step time percentiles, the share of step time run
    with fewer than `full_batch` sequences (default: the most seen), and the steps whose forward
    held prompt tokens (mixed or prefill: no decode CUDA graph) with their time."""
    keep = [i for i, s in enumerate(columns["start"])
            if window is None or window[0] <= s <= window[1]]
    rows = [(columns["start"][i], columns["end"][i], columns["running"][i], columns["tokens"][i])
            for i in keep]
    prompt_steps = [i for i in keep if columns["batched"][i] > columns["chunks"][i]]
    n = len(rows)
    if n == 0:
        return {"steps": 0}
    durations = sorted(e - s for s, e, _, _ in rows)
    inside = sum(durations)
    wall = rows[-1][1] - rows[0][0]
    full = full_batch if full_batch is not None else max(r for _, _, r, _ in rows)
    below = sum(e - s for s, e, r, _ in rows if r < full)
    tokens = sum(t for *_, t in rows)
    return {
        "steps": n,
        "wall_s": wall,
        "inside_steps_s": inside,
        "between_steps_s": wall - inside,
        "tokens": tokens,
        "mean_running": sum(r for _, _, r, _ in rows) / n,
        "mean_tokens_per_step": tokens / n,
        "step_ms_p50": 1e3 * durations[n // 2],
        "step_ms_p90": 1e3 * durations[min(int(n * 0.9), n - 1)],
        "full_batch": full,
        "share_of_step_time_below_full": below / inside if inside else 0.0,
        "prompt_steps": len(prompt_steps),
        "prompt_steps_s": sum(columns["end"][i] - columns["start"][i] for i in prompt_steps),
    }
