"""TPPartition: one rank's share of a model under tensor parallelism (no torch).

Attention is split by KV-head groups, so each rank's query heads use its own KV heads:

    9 heads, 3 KV heads, 2 ranks:   rank 0: KV 0,1  q 0-5     rank 1: KV 2  q 6-8
    4 heads, 1 KV head,  2 ranks:   rank 0: KV 0    q 0-1     rank 1: KV 0  q 2-3  (replicated)

Uneven shares are allowed (the default model has 3 KV heads): every split is into contiguous
ranges, the first ranks taking one more unit. The MLP's intermediate columns and the vocabulary
rows are split the same way; the vocabulary is padded so every rank holds the same number of
rows (the LM head's all-gather needs equal pieces).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hearth.engine.model_config import ModelConfig

TP_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                    "Qwen3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")


def split_range(total: int, parts: int, index: int, unit: int = 1) -> tuple[int, int]:
    """(start, size) of part `index` when `total` (a multiple of `unit`) is cut into `parts`
    contiguous pieces of whole units, the first pieces one unit larger."""
    units, extra = divmod(total // unit, parts)
    start = index * units + min(index, extra)
    return start * unit, (units + (1 if index < extra else 0)) * unit


@dataclass(frozen=True)
class TPPartition:
    rank: int
    world_size: int
    heads: tuple[int, int]  # (first query head, number)
    kv_heads: tuple[int, int]  # (first KV head, number)
    intermediate: tuple[int, int]  # (first MLP column, number)
    vocab: tuple[int, int]  # (first row, rows held incl. padding)
    vocab_size: int  # the model's real vocabulary

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """The ModelConfig this rank's modules are built from: its own share of every dim."""
        return dataclasses.replace(
            config, num_heads=self.heads[1], num_kv_heads=self.kv_heads[1],
            intermediate_size=self.intermediate[1], vocab_size=self.vocab[1])


def make_partition(config: ModelConfig, rank: int, world_size: int,
                   mlp_unit: int = 1) -> TPPartition:
    """Rank `rank`'s share; ValueError naming the shape that cannot be split."""
    if config.architecture not in TP_ARCHITECTURES:
        raise ValueError(f"tensor parallelism supports {', '.join(TP_ARCHITECTURES)}; "
                         f"{config.architecture} runs with tensor_parallel_size 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    heads, kv_heads = _attention_split(config, rank, world_size)
    if config.intermediate_size % mlp_unit or config.intermediate_size // mlp_unit < world_size:
        raise ValueError(f"the MLP's {config.intermediate_size} columns cannot be split into "
                         f"{world_size} pieces of whole {mlp_unit}-column groups")
    intermediate = split_range(config.intermediate_size, world_size, rank, mlp_unit)
    rows = -(-config.vocab_size // world_size)
    return TPPartition(rank, world_size, heads, kv_heads, intermediate, (rank * rows, rows),
                       config.vocab_size)


def _attention_split(config: ModelConfig, rank: int, world_size: int):
    nh, nkv = config.num_heads, config.num_kv_heads
    group = nh // nkv  # query heads per KV head
    if nkv >= world_size:  # split whole KV groups
        kv = split_range(nkv, world_size, rank)
        return (kv[0] * group, kv[1] * group), kv
    if world_size % nkv or nh % world_size:
        raise ValueError(
            f"{nkv} KV heads cannot be replicated over {world_size} ranks with {nh} query heads: "
            f"tensor_parallel_size must be a multiple of the KV heads and divide the query heads")
    per_kv = world_size // nkv  # ranks sharing one KV head
    heads = split_range(nh, world_size, rank)
    return heads, (rank // per_kv, 1)
