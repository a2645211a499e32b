"""The layers that talk across ranks, wrapped around a model built from its local config.

- RowParallel: a row-parallel linear (o_proj, down_proj) followed by the one all-reduce that sums
  the ranks' partial outputs.
- VocabParallelEmbedding: each rank looks up the ids in its vocabulary rows, zeros elsewhere;
  an all-reduce assembles the embeddings.
- TensorParallelModel: the model with its LM head's logits all-gathered (every rank computes its
  rows' logits; the driver samples from the whole vocabulary).

Wrapping happens after the weights are loaded, so checkpoint names never see the wrappers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hearth.engine.distributed.communicator import Communicator
from hearth.engine.distributed.partition import TPPartition


class RowParallel(nn.Module):
    def __init__(self, linear: nn.Module, comm: Communicator) -> None:
        super().__init__()
        self.linear = linear
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(self.linear(x))


class VocabParallelEmbedding(nn.Module):
    def __init__(self, embedding: nn.Embedding, part: TPPartition, comm: Communicator) -> None:
        super().__init__()
        self.weight = embedding.weight  # shared with a tied LM head
        self.start, self.rows = part.vocab
        self.comm = comm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # (num_tokens, hidden)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.comm.all_reduce(out)


class TensorParallelModel(nn.Module):
    """The rank's model; forward as before, logits gathered over the ranks' vocabulary rows."""

    def __init__(self, model: nn.Module, part: TPPartition, comm: Communicator) -> None:
        super().__init__()
        self.model = model
        self.config = model.config  # the local config (KV cache shapes)
        self.vocab_size = part.vocab_size
        self.comm = comm

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.model(*args, **kwargs)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        local = self.model.compute_logits(hidden)  # (rows, local vocab)
        return self.comm.all_gather(local, dim=-1)[:, : self.vocab_size]  # (rows, vocab)


def parallelize(model: nn.Module, part: TPPartition, comm: Communicator) -> TensorParallelModel:
    """Wrap a loaded local model's cross-rank layers (in place) and the model itself."""
    for layer in model.layers:
        layer.self_attn.o_proj = RowParallel(layer.self_attn.o_proj, comm)
        if not hasattr(layer.mlp, "down_proj"):
            raise ValueError("tensor parallelism needs a dense MLP (down_proj) in every layer")
        layer.mlp.down_proj = RowParallel(layer.mlp.down_proj, comm)
    model.embed_tokens = VocabParallelEmbedding(model.embed_tokens, part, comm)
    return TensorParallelModel(model, part, comm)
