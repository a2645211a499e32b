"""How one rank's model differs from the single-process build: which device, which share of the
weights, which KV-cache shape, and the workers (rank 0 only).

engine/model_builder.py calls these when tensor_parallel_size > 1; with 1 it never imports them.
"""

from __future__ import annotations

import dataclasses
import threading

import torch

from hearth.engine.config import EngineConfig
from hearth.engine.distributed.communicator import (
    CommConfig,
    Communicator,
    TorchCommunicator,
    free_local_address,
    resolve_backend,
)
from hearth.engine.distributed.parallel_layers import parallelize
from hearth.engine.distributed.partition import TPPartition, make_partition
from hearth.engine.distributed.shard_weights import shard_weights
from hearth.engine.loader import LoadedSource
from hearth.engine.model_config import ModelConfig


def rank_device(config: EngineConfig, base: torch.device, rank: int) -> torch.device:
    """Rank r's device: tensor_parallel_devices[r] when given, else the r-th card from `base`."""
    if config.tensor_parallel_devices:
        return torch.device(config.tensor_parallel_devices[rank])
    if base.type != "cuda":
        return base
    index = (base.index or 0) + rank
    if index >= torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size {config.tensor_parallel_size} from {base} needs "
                         f"cuda:{index}, but {torch.cuda.device_count()} GPU(s) are visible")
    return torch.device("cuda", index)


def start_driver(config: EngineConfig, device: torch.device, entry):
    """Rank 0: start the workers (each runs `entry(config, comm_config)`), then join the process
    group with them. -> (comm, workers)"""
    from hearth.engine.distributed.workers import WorkerGroup

    backend = resolve_backend(config.tensor_parallel_backend, device)
    comm_config = CommConfig(0, config.tensor_parallel_size, free_local_address(), backend)
    workers = WorkerGroup(config, comm_config, entry)
    try:
        return _join_watching(comm_config, workers), workers
    except BaseException:
        workers.stop(timeout_s=0)
        raise


def _join_watching(comm_config: CommConfig, workers) -> Communicator:
    """Join the process group on a helper thread, checking the workers meanwhile: a worker that
    dies before joining would otherwise keep rank 0 waiting for the whole rendezvous timeout."""
    joined: list = []

    def join() -> None:
        try:
            joined.append(TorchCommunicator(comm_config))
        except BaseException as error:  # noqa: BLE001 - re-raised on the caller's thread
            joined.append(error)

    thread = threading.Thread(target=join, name="hearth-tp-join", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
        workers.check()  # RuntimeError naming the dead worker
    if isinstance(joined[0], BaseException):
        raise joined[0]
    return joined[0]


def mlp_unit(config: ModelConfig) -> int:
    """Quantized down_proj inputs split in whole groups of whole packed words."""
    q = config.quantization
    if q is None or q.method not in ("awq", "gptq"):
        return 1
    pack = 32 // q.bits
    group = q.group_size or config.intermediate_size
    return group * pack // _gcd(group, pack)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


@dataclasses.dataclass(frozen=True)
class RankShare:
    part: TPPartition
    source: LoadedSource  # the local config and the sharded weight stream
    runner_config: ModelConfig  # local heads (KV cache), the full vocabulary (sampler)


def rank_share(source: LoadedSource, comm: Communicator) -> RankShare:
    full = source.config
    part = make_partition(full, comm.rank, comm.world_size, mlp_unit(full))
    local = part.local_config(full)
    local_source = dataclasses.replace(
        source, config=local, weights=lambda: shard_weights(source.weights(), full, part))
    runner_config = dataclasses.replace(local, vocab_size=full.vocab_size)
    return RankShare(part, local_source, runner_config)


def agree_num_blocks(num_blocks: int, comm: Communicator) -> int:
    """Every rank must hold the same block count: the smallest of their budgets."""
    t = torch.tensor([num_blocks], dtype=torch.int64)
    return int(comm.all_reduce(t, op="min")[0])


def make_runner(model, runner_config: ModelConfig, runner_args: tuple, kv_dtype, comm):
    """Rank 0: the TensorParallelRunner that broadcasts steps; workers: a plain ModelRunner
    driven by worker_loop. Every rank allocates the same number of KV blocks."""
    from hearth.engine.distributed.tp_runner import TensorParallelRunner
    from hearth.engine.model_runner import ModelRunner

    block_size, num_blocks, seed, limits = runner_args
    args = (model, runner_config, block_size, agree_num_blocks(num_blocks, comm), seed, limits)
    if comm.rank == 0:
        return TensorParallelRunner(*args, kv_cache_dtype=kv_dtype, comm=comm)
    return ModelRunner(*args, kv_cache_dtype=kv_dtype)


def wrap_model(model: torch.nn.Module, share: RankShare, comm: Communicator) -> torch.nn.Module:
    return parallelize(model, share.part, comm)
