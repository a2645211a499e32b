"""Refuse a model that cannot fit the device before a single weight is read (no torch).

    need      = weights (every parameter at its load precision: the model dtype, or the packed
                bits of a quantized checkpoint / a GGUF kept quantized) + the smallest useful KV
                cache (one sequence of max_model_len, or what kv_cache_gib reserves)
    available = CUDA: min(free, total * gpu_memory_utilization) of the card
                CPU:  MemAvailable of /proc/meminfo (no check where the system does not say)

The estimate leaves out activations and the CUDA context, so it refuses only what cannot run at
all; the KV sizing after loading (engine/model_builder.py) still checks the rest. The message
names the model, each number in GiB, and what to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hearth.engine.model_config import ModelConfig

GIB = 1 << 30


@dataclass(frozen=True)
class MemoryNeed:
    weight_bytes: int
    kv_bytes: int
    weights_what: str  # e.g. "bfloat16 weights", "GGUF blocks kept quantized"
    kv_what: str  # e.g. "one 4096-token sequence"

    @property
    def total(self) -> int:
        return self.weight_bytes + self.kv_bytes


@dataclass(frozen=True)
class DeviceMemory:
    label: str  # "cuda:0 (NVIDIA H100 80GB HBM3)", "host RAM"
    free: int
    total: int
    usable: int  # what Hearth may take of it


def weight_bytes(config: ModelConfig, dtype_bytes: int, kept_file_bytes: int | None) -> int:
    """Bytes of the loaded weights. kept_file_bytes: a GGUF kept quantized (its blocks stay as
    in the file; embeddings, norms and experts come as floats: the experts' share of the file,
    by parameter count, is counted at dtype_bytes instead)."""
    embed = config.vocab_size * config.hidden_size
    if kept_file_bytes is not None:
        experts = config.num_expert_params
        blocks = kept_file_bytes * (1 - experts / config.num_params)
        return int(blocks) + (experts + embed) * dtype_bytes
    quant = config.quantization
    if quant is None or quant.method == "gguf":
        return config.num_params * dtype_bytes
    group = quant.group_size or config.hidden_size  # an fp16 scale and a zero point a group
    packed = config.num_linear_params * (quant.bits / 8 + 4 / group)
    return int(packed + (config.num_params - config.num_linear_params) * dtype_bytes)


def host_memory(meminfo: Path = Path("/proc/meminfo")) -> DeviceMemory | None:
    """This machine's available and total RAM, or None where /proc/meminfo does not say."""
    try:
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines()
                      if ":" in line)
        available = int(fields["MemAvailable"].split()[0]) * 1024
        total = int(fields["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    return DeviceMemory("host RAM", available, total, available)


def check_fits(name: str, need: MemoryNeed, memory: DeviceMemory | None) -> None:
    """ValueError with the numbers when `need` exceeds what `memory` leaves usable."""
    if memory is None or need.total <= memory.usable:
        return
    raise ValueError(
        f"model {name!r} does not fit {memory.label}: it needs {_gib(need.total)} "
        f"({_gib(need.weight_bytes)} of {need.weights_what} + {_gib(need.kv_bytes)} of KV cache "
        f"for {need.kv_what}), and {memory.label} has {_gib(memory.free)} free of "
        f"{_gib(memory.total)}, {_gib(memory.usable)} usable. Use a smaller or quantized model "
        "(a Q4 GGUF with gguf_keep_quantized, an AWQ/GPTQ checkpoint), a 16-bit dtype, a lower "
        "max_model_len / kv_cache_gib, or free memory on the device"
    )


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.2f} GiB"


# ---- max_model_len "auto": the longest context the KV budget serves at full concurrency ----

AUTO = "auto"
MIN_AUTO_LEN = 256  # shorter than this, "auto" refuses: the budget is too small to be useful


@dataclass(frozen=True)
class ContextChoice:
    """What `max_model_len="auto"` picked, and from what (logged at startup; `hearth doctor`)."""

    max_model_len: int
    kv_tokens: int  # tokens the KV budget holds
    kv_budget_bytes: int
    max_num_seqs: int
    model_max_len: int
    budget_from: str  # "kv_cache_gib=2.0", "free memory of cuda:0 (...)"

    def describe(self) -> str:
        capped = " (the model's own maximum)" if self.max_model_len == self.model_max_len else ""
        return (f"max_model_len auto: {self.max_model_len} tokens{capped}. The KV cache of "
                f"{_gib(self.kv_budget_bytes)} ({self.budget_from}) holds {self.kv_tokens} tokens: "
                f"{self.max_num_seqs} sequences (max_num_seqs) of the average length, half the "
                "context, fit at once")


def choose_max_model_len(kv_budget_bytes: int, bytes_per_token: int, max_num_seqs: int,
                         block_size: int, model_max_len: int, budget_from: str) -> ContextChoice:
    """The longest context L (a multiple of block_size, at most the model's) such that
    max_num_seqs sequences of the average length L / 2 (lengths spread evenly up to L) fit the
    budget together, and one sequence of L fits alone. ValueError with the numbers when L would
    be under MIN_AUTO_LEN."""
    kv_tokens = max(0, kv_budget_bytes) // bytes_per_token // block_size * block_size
    length = min(model_max_len, kv_tokens, 2 * kv_tokens // max_num_seqs)
    length = length // block_size * block_size
    if length < min(MIN_AUTO_LEN, model_max_len):
        raise ValueError(
            f"max_model_len auto: the KV cache of {_gib(kv_budget_bytes)} ({budget_from}) holds "
            f"{kv_tokens} tokens, {bytes_per_token} bytes each; {max_num_seqs} sequences "
            f"(max_num_seqs) at half the context leave a context of {length} tokens, under the "
            f"{MIN_AUTO_LEN} this needs. Lower --max-num-seqs, raise --kv-cache-gib / "
            "--gpu-memory-utilization, use --kv-cache-dtype fp8, or set --max-model-len")
    return ContextChoice(length, kv_tokens, kv_budget_bytes, max_num_seqs, model_max_len,
                         budget_from)


def min_auto_kv_bytes(bytes_per_token: int, max_num_seqs: int, model_max_len: int) -> int:
    """The smallest KV cache "auto" accepts: max_num_seqs sequences at half MIN_AUTO_LEN."""
    shortest = min(MIN_AUTO_LEN, model_max_len)
    return max(shortest, max_num_seqs * shortest // 2) * bytes_per_token
