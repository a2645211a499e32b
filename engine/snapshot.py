"""EngineSnapshot: the engine's state as the UI and /metrics read it, from any thread (no torch)."""

from __future__ import annotations

from dataclasses import dataclass

from hearth.engine.block_manager import BlockSnapshot
from hearth.engine.scheduler import SchedulerSnapshot
from hearth.engine.speculative.stats import SpecDecodeStats


@dataclass(frozen=True)
class EngineSnapshot:
    scheduler: SchedulerSnapshot
    num_prompt_tokens_total: int
    num_generation_tokens_total: int
    num_requests_finished: int
    model_name: str
    device: str
    dtype: str  # what the weights multiply in (model_builder.BuiltModel.precision)
    max_model_len: int
    taken_at: float  # time.monotonic()
    spec_decode: SpecDecodeStats | None = None  # None: speculative decoding is off
    # Data parallelism: each replica's own snapshot (this one sums their totals); () otherwise.
    replicas: tuple[EngineSnapshot, ...] = ()

    @property
    def blocks(self) -> BlockSnapshot:
        return self.scheduler.blocks
