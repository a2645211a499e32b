"""Communicator: the collectives tensor parallelism needs, behind one small interface.

`TorchCommunicator` runs them with torch.distributed: NCCL for CUDA tensors, gloo on CPU (and
gloo with a host round trip for CUDA tensors, so two ranks can share one card in tests). The step
inputs the driver broadcasts travel as Python objects over a gloo group in either case. A custom
all-reduce (one-shot over peer-to-peer memory, faster than NCCL's at batch 1) is one more subclass
that overrides `all_reduce`.
"""

from __future__ import annotations

import datetime
import socket
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.distributed as dist

BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class CommConfig:
    """Everything a rank needs to join the group."""

    rank: int
    world_size: int
    init_method: str  # tcp://127.0.0.1:PORT
    backend: str = "gloo"  # gloo | nccl (resolved, never "auto")
    timeout_s: float = 600.0


def free_local_address() -> str:
    """A tcp:// address on loopback with a port no one listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"tensor_parallel_backend must be one of {', '.join(BACKENDS)}; "
                         f"got {backend!r}")
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("tensor_parallel_backend='nccl' needs CUDA devices; use 'gloo' on CPU")
    return backend


class Communicator(ABC):
    rank: int
    world_size: int

    @abstractmethod
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place over every rank (op: sum | min | max); returns `tensor`."""

    @abstractmethod
    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's equal-shaped `tensor`, concatenated along `dim` in rank order."""

    @abstractmethod
    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """In place: `src`'s tensor on every rank."""

    @abstractmethod
    def broadcast_object(self, obj: object = None, src: int = 0) -> object:
        """`src`'s picklable object on every rank (step inputs, stop messages)."""

    @abstractmethod
    def shutdown(self) -> None: ...


_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


class TorchCommunicator(Communicator):
    def __init__(self, config: CommConfig) -> None:
        self.rank, self.world_size = config.rank, config.world_size
        self.backend = config.backend
        timeout = datetime.timedelta(seconds=config.timeout_s)
        dist.init_process_group(config.backend, init_method=config.init_method,
                                rank=config.rank, world_size=config.world_size, timeout=timeout)
        # Step inputs are Python objects on the host: a gloo group carries them under NCCL too.
        self._objects = dist.new_group(backend="gloo") if config.backend == "nccl" else None

    def _staged(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` where the backend can reach it: gloo reduces host memory, NCCL device memory
        (a host tensor under NCCL, e.g. the ranks' block counts, goes through this rank's card)."""
        if tensor.is_cuda and self.backend == "gloo":
            return tensor.cpu()
        if not tensor.is_cuda and self.backend == "nccl":
            return tensor.to(torch.device("cuda", torch.cuda.current_device()))
        return tensor.contiguous()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        staged = self._staged(tensor)
        dist.all_reduce(staged, _OPS[op])
        return tensor if staged is tensor else tensor.copy_(staged)

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        src = self._staged(tensor)
        pieces = [torch.empty_like(src) for _ in range(self.world_size)]
        dist.all_gather(pieces, src)
        return torch.cat(pieces, dim=dim).to(tensor.device)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        staged = self._staged(tensor)
        dist.broadcast(staged, src)
        return tensor if staged is tensor else tensor.copy_(staged)

    def broadcast_object(self, obj: object = None, src: int = 0) -> object:
        box = [obj]
        dist.broadcast_object_list(box, src, group=self._objects)
        return box[0]

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
