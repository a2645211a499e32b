"""The garbage collector and the server's tail latency: freeze the startup heap, count the pauses.

A loaded server holds ~430,000 GC-tracked objects that live as long as the process (torch,
transformers, FastAPI, pydantic and Gradio modules, the model's Python objects). Every full
(generation 2) collection walks all of them with the GIL held: the event loop and the engine
thread both stop. On the 2-core box one such pass took 0.57-0.81 s; under load a full collection
comes every few hundred requests and stalls every request in flight, the slowest percent of them
(docs/benchmarks.md, "Tail latency"). `gc.freeze()` once the model is loaded moves that heap to
the permanent generation, which no collection walks; what requests allocate is still collected.
`GcPauses` records each collection's duration (gc.callbacks), for /metrics.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field

logger = logging.getLogger("hearth.server")


def freeze_heap() -> int:
    """Collect once, then freeze what survives; returns the number of objects frozen."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.info("froze %d startup objects out of the garbage collector's reach", frozen)
    return frozen


@dataclass(eq=False)  # hashable: a prometheus registry keeps its collectors in a dict
class GcPauses:
    """Durations of the collector's passes, by generation, while installed."""

    count: dict[int, int] = field(default_factory=lambda: {0: 0, 1: 0, 2: 0})
    seconds: dict[int, float] = field(default_factory=lambda: {0: 0.0, 1: 0.0, 2: 0.0})
    max_seconds: float = 0.0
    _started: float = 0.0

    def install(self) -> None:
        gc.callbacks.append(self._on_gc)

    def uninstall(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        elapsed = time.perf_counter() - self._started
        generation = info.get("generation", 2)
        self.count[generation] = self.count.get(generation, 0) + 1
        self.seconds[generation] = self.seconds.get(generation, 0.0) + elapsed
        self.max_seconds = max(self.max_seconds, elapsed)

    def collect(self):
        """Prometheus collector: the passes and their seconds, by generation."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        passes = CounterMetricFamily("hearth_gc_collections", "Garbage-collector passes.",
                                     labels=["generation"])
        seconds = CounterMetricFamily("hearth_gc_pause_seconds",
                                      "Seconds the garbage collector held the GIL.",
                                      labels=["generation"])
        for generation in sorted(self.count):
            passes.add_metric([str(generation)], self.count[generation])
            seconds.add_metric([str(generation)], self.seconds[generation])
        longest = GaugeMetricFamily("hearth_gc_pause_max_seconds",
                                    "The longest garbage-collector pass so far.")
        longest.add_metric([], self.max_seconds)
        return [passes, seconds, longest]
