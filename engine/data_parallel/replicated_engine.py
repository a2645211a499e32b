"""ReplicatedEngine: N LLMEngines (one per GPU) behind the Engine contract the async layer uses.

Requests go to the replica the Router picks (prefix cache first, then least work). One step
steps every busy replica at once on a thread pool: each replica's forward runs on its own card
(torch releases the GIL in its kernels), and the outputs of all replicas come back together.
The snapshot is replica 0's shape with the totals summed and every replica's own snapshot in
`replicas`, for /metrics and the UI's monitor.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from hearth.engine.config import EngineConfig
from hearth.engine.data_parallel.router import Router
from hearth.engine.outputs import RequestOutput
from hearth.engine.prepare import PreparedRequest
from hearth.engine.snapshot import EngineSnapshot

logger = logging.getLogger(__name__)


def replica_configs(config: EngineConfig, num_replicas: int,
                    cuda_count: Callable[[], int] | None = None) -> list[EngineConfig]:
    """Replica i on the i-th card from `config.device` (cuda:N), or all on the CPU."""
    if config.device == "cpu":
        return [config] * num_replicas
    if cuda_count is None:
        import torch

        cuda_count = torch.cuda.device_count
    base = 0 if config.device in ("auto", "cuda") else int(config.device.removeprefix("cuda:"))
    count = cuda_count()
    if count == 0 and config.device == "auto":
        return [config] * num_replicas
    if base + num_replicas > count:
        raise ValueError(f"data_parallel_size {num_replicas} from cuda:{base} needs "
                         f"{base + num_replicas} GPUs; {count} are visible")
    return [dataclasses.replace(config, device=f"cuda:{base + i}") for i in range(num_replicas)]


class ReplicatedEngine:
    def __init__(self, replicas: list, max_imbalance_tokens: int = 16384) -> None:
        """`replicas`: loaded LLMEngines (or anything with their methods)."""
        if not replicas:
            raise ValueError("data parallelism needs at least one replica")
        self.replicas = replicas
        self.model_info = replicas[0].model_info
        self.router = Router([r.scheduler.block_manager for r in replicas], max_imbalance_tokens)
        self._pool = ThreadPoolExecutor(len(replicas), thread_name_prefix="hearth-replica")

    @classmethod
    def load(cls, config: EngineConfig, num_replicas: int, progress: bool = True):
        from hearth.engine.llm_engine import LLMEngine

        engines = []
        try:
            for replica_config in replica_configs(config, num_replicas):
                engines.append(LLMEngine(replica_config, progress=progress))
        except BaseException:
            for engine in engines:
                engine.shutdown()
            raise
        return cls(engines)

    def add_prepared(self, request_id: str, request: PreparedRequest, priority: int = 0) -> None:
        decision = self.router.route(request_id, request.token_ids, request.params.max_tokens)
        try:
            self.replicas[decision.replica].add_prepared(request_id, request, priority)
        except BaseException:
            self.router.finish(request_id)
            raise
        logger.debug("request %s -> replica %d (%s, %d cached tokens)", request_id,
                     decision.replica, decision.reason, decision.cached_tokens)

    def abort_request(self, request_id: str) -> None:
        replica = self.router.replica_of(request_id)
        if replica is not None:
            self.replicas[replica].abort_request(request_id)
            self.router.finish(request_id)

    def has_unfinished_requests(self) -> bool:
        return any(r.has_unfinished_requests() for r in self.replicas)

    def step(self) -> list[RequestOutput]:
        busy = [r for r in self.replicas if r.has_unfinished_requests()]
        if len(busy) == 1:
            outputs = busy[0].step()
        else:
            outputs = [o for result in self._pool.map(lambda r: r.step(), busy) for o in result]
        for output in outputs:
            if output.finished:
                self.router.finish(output.request_id)
        return outputs

    def snapshot(self) -> EngineSnapshot:
        snaps = tuple(r.snapshot() for r in self.replicas)
        return dataclasses.replace(
            snaps[0],
            num_prompt_tokens_total=sum(s.num_prompt_tokens_total for s in snaps),
            num_generation_tokens_total=sum(s.num_generation_tokens_total for s in snaps),
            num_requests_finished=sum(s.num_requests_finished for s in snaps),
            device=", ".join(s.device for s in snaps),
            replicas=snaps)

    def check_health(self) -> None:
        for replica in self.replicas:
            replica.check_health()

    def shutdown(self) -> None:
        for replica in self.replicas:
            replica.shutdown()
        self._pool.shutdown(wait=False)
