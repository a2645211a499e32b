"""Cut a checkpoint's HF-named tensors to one rank's share as they stream in.

The model is built from `TPPartition.local_config`, so its unchanged `load_weights` (fused
offsets included) receives tensors of the local shapes:

    column-parallel (outputs split)   q/k/v_proj, gate/up_proj    float: rows of W (N, K)
    row-parallel (inputs split)       o_proj, down_proj           float: columns of W
    vocab-parallel                    embed_tokens, lm_head       rows, zero-padded

AWQ / GPTQ int4 tensors are cut on their packing and group boundaries: outputs in whole int32
words, inputs in whole groups. A shape that cannot be cut so raises ValueError naming it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from hearth.engine.distributed.partition import TPPartition
from hearth.engine.model_config import ModelConfig
from hearth.engine.quantization.config import QuantConfig

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")
VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


def shard_weights(weights: Iterable[tuple[str, torch.Tensor]], config: ModelConfig,
                  part: TPPartition) -> Iterator[tuple[str, torch.Tensor]]:
    """`weights` (the full checkpoint's stream) -> this rank's pieces, same names."""
    quant = config.quantization
    if quant is not None and quant.method not in ("awq", "gptq"):
        raise ValueError(f"tensor parallelism splits float, AWQ and GPTQ weights; "
                         f"{quant.method} checkpoints run with tensor_parallel_size 1")
    for name, tensor in weights:
        yield name, _shard_one(name, tensor, config, part)


def _shard_one(name: str, tensor: torch.Tensor, config: ModelConfig,
               part: TPPartition) -> torch.Tensor:
    if name in VOCAB:
        return _vocab_rows(tensor, part)
    module, _, key = name.rpartition(".")
    proj = module.rpartition(".")[2]
    if proj in COLUMN:
        return _column(tensor, key, _out_range(proj, config, part), config.quantization)
    if proj in ROW:
        return _row(name, tensor, key, _in_range(proj, config, part), config.quantization,
                    part.rank)
    return tensor  # norms and everything else: replicated


def _out_range(proj: str, config: ModelConfig, part: TPPartition) -> tuple[int, int]:
    hd = config.head_dim
    if proj == "q_proj":
        return part.heads[0] * hd, part.heads[1] * hd
    if proj in ("k_proj", "v_proj"):
        return part.kv_heads[0] * hd, part.kv_heads[1] * hd
    return part.intermediate


def _in_range(proj: str, config: ModelConfig, part: TPPartition) -> tuple[int, int]:
    if proj == "o_proj":
        return part.heads[0] * config.head_dim, part.heads[1] * config.head_dim
    return part.intermediate


def _vocab_rows(tensor: torch.Tensor, part: TPPartition) -> torch.Tensor:
    start, rows = part.vocab
    piece = tensor[start:start + rows]
    if piece.shape[0] == rows:
        return piece.contiguous()
    padded = tensor.new_zeros((rows, *tensor.shape[1:]))  # rows past the vocabulary: never hit
    padded[: piece.shape[0]] = piece
    return padded


def _column(tensor: torch.Tensor, key: str, out: tuple[int, int],
            quant: QuantConfig | None) -> torch.Tensor:
    start, size = out
    if key in ("weight", "bias"):
        return tensor[start:start + size].contiguous()
    pack = 32 // quant.bits
    if key == "g_idx":
        return tensor
    if key == "scales" or (key == "qweight" and quant.method == "gptq"):
        return tensor[:, start:start + size].contiguous()  # (.., N) unpacked along N
    if start % pack or size % pack:  # qzeros, AWQ qweight: N packed `pack` per word
        raise ValueError(f"{size} outputs from {start} cannot be cut out of {quant.bits}-bit "
                         f"words packing {pack} outputs each")
    return tensor[:, start // pack:(start + size) // pack].contiguous()


def _row(name: str, tensor: torch.Tensor, key: str, inp: tuple[int, int],
         quant: QuantConfig | None, rank: int) -> torch.Tensor:
    start, size = inp
    if key == "bias":  # added once: by rank 0, before the all-reduce sums the ranks
        return tensor if rank == 0 else torch.zeros_like(tensor)
    if key == "weight":
        return tensor[:, start:start + size].contiguous()
    group = quant.group_size or None
    if group is None or start % group or size % group:
        raise ValueError(f"{name}: inputs {start}..{start + size} do not fall on the "
                         f"{quant.group_size}-input quantization groups; tensor parallelism "
                         "needs whole groups per rank (quantize with a smaller group size)")
    if key == "g_idx":
        return _g_idx(name, tensor, start, size, group)
    if key in ("scales", "qzeros"):
        return tensor[start // group:(start + size) // group].contiguous()
    pack = 32 // quant.bits  # qweight: GPTQ packs K (rows / pack), AWQ keeps K rows
    if quant.method == "gptq":
        return tensor[start // pack:(start + size) // pack].contiguous()
    return tensor[start:start + size].contiguous()


def _g_idx(name: str, g_idx: torch.Tensor, start: int, size: int, group: int) -> torch.Tensor:
    piece = g_idx[start:start + size].to(torch.int64) - start // group
    if int(piece.min()) < 0 or int(piece.max()) >= size // group:
        raise ValueError(f"{name}: act-order (desc_act) groups mix inputs of different ranks; "
                         "such checkpoints run with tensor_parallel_size 1")
    return piece.to(g_idx.dtype)
