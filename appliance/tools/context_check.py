"""`hearth doctor`'s context line: before a start, the KV-cache budget, the context length it gives
(`--max-model-len auto` or the one set) and whether the model fits the device at all, by the
engine's own rules (engine/memory_check.py), so that a start that would be refused is named here.

On a GPU without --kv-cache-gib the budget is an estimate: the card's usable memory after the
weights, less a reserve for activations and CUDA graphs (the server measures it with a profiling
pass at start; its number is the one that counts).
"""

from __future__ import annotations

from dataclasses import dataclass

from hearth.appliance.settings import Settings
from hearth.engine.config import DEFAULT_CPU_KV_CACHE_GIB
from hearth.engine.memory_check import (
    AUTO,
    ContextChoice,
    DeviceMemory,
    MemoryNeed,
    check_fits,
    choose_max_model_len,
    host_memory,
    weight_bytes,
)

_GIB = 1 << 30
GPU_RESERVE_BYTES = 3 * _GIB // 2  # activations of a profiling pass + the CUDA-graph pool


@dataclass(frozen=True)
class ContextReport:
    status: str  # "OK" | "WARN" (the model could not be read) | "FAIL"
    detail: str


@dataclass(frozen=True)
class KvBudget:
    bytes: int
    source: str  # what it came from, for the message
    per_token: int  # bytes of K and V a token takes in every layer


def context_report(settings: Settings) -> ContextReport:
    """Load the model's config and tokenizer (no weights), then judge its context and memory."""
    import torch

    from hearth.engine.catalog import resolve_model
    from hearth.engine.loader import load_model_source

    try:
        source = load_model_source(resolve_model(settings.model), settings.gguf_keep_quantized)
    except Exception as error:  # noqa: BLE001 - the model and checksums lines say what is wrong
        return ContextReport("WARN", f"the model's config could not be read: {error}")
    cuda = settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available())
    dtype_bytes = (2 if cuda else 4) if settings.dtype == "auto" else (
        4 if settings.dtype == "float32" else 2)
    weights = weight_bytes(source.config, dtype_bytes, None)
    memory = _gpu_memory(settings) if cuda else host_memory()
    kv_bytes = 1 if settings.kv_cache_dtype != "auto" else dtype_bytes
    budget = kv_budget(settings, memory if cuda else None, weights,
                       source.config.kv_bytes_per_token(kv_bytes))
    return judge(settings, source.name, source.max_model_len, weights, budget, memory)


def kv_budget(settings: Settings, gpu: DeviceMemory | None, weights: int,
              per_token: int) -> KvBudget:
    if settings.kv_cache_gib is not None:
        return KvBudget(int(settings.kv_cache_gib * _GIB),
                        f"kv_cache_gib={settings.kv_cache_gib}", per_token)
    if gpu is None:
        return KvBudget(int(DEFAULT_CPU_KV_CACHE_GIB * _GIB),
                        f"the CPU default kv_cache_gib={DEFAULT_CPU_KV_CACHE_GIB}", per_token)
    left = gpu.usable - weights - GPU_RESERVE_BYTES
    return KvBudget(max(0, left), f"estimated: {gpu.label}'s usable memory after the weights",
                    per_token)


def judge(settings: Settings, name: str, model_max_len: int, weights: int, budget: KvBudget,
          memory: DeviceMemory | None) -> ContextReport:
    """The context line, or FAIL with what `hearth serve` would refuse and why (pure)."""
    try:
        if settings.max_model_len == AUTO:
            choice = _choose(settings, model_max_len, budget)
            detail, length = choice.describe(), choice.max_model_len
        else:
            length = settings.max_model_len or model_max_len
            detail = _fixed_context(settings, model_max_len, length, budget)
        kv_need = min(budget.bytes, length * budget.per_token)
        check_fits(name, MemoryNeed(weights, kv_need, "weights", f"one {length}-token sequence"),
                   memory)
    except ValueError as error:
        return ContextReport("FAIL", str(error))
    return ContextReport("OK", detail)


def _choose(settings: Settings, model_max_len: int, budget: KvBudget) -> ContextChoice:
    return choose_max_model_len(budget.bytes, budget.per_token, settings.max_num_seqs,
                                settings.engine.block_size, model_max_len, budget.source)


def _fixed_context(settings: Settings, model_max_len: int, length: int, budget: KvBudget) -> str:
    if length > model_max_len:
        raise ValueError(f"max_model_len {length} exceeds the model's maximum of {model_max_len}")
    tokens = budget.bytes // budget.per_token
    if tokens < length:
        raise ValueError(
            f"the KV cache of {budget.bytes / _GIB:.2f} GiB ({budget.source}) holds {tokens} "
            f"tokens, fewer than one sequence of max_model_len {length}: raise --kv-cache-gib, "
            "lower --max-model-len, or use --max-model-len auto")
    try:
        picked = _choose(settings, model_max_len, budget).max_model_len
        auto = f"; --max-model-len auto would pick {picked}"
    except ValueError:
        auto = ""
    return (f"max_model_len {length}: the KV cache of {budget.bytes / _GIB:.2f} GiB "
            f"({budget.source}) holds {tokens} tokens, {tokens // length} full-length sequences "
            f"at once (max_num_seqs {settings.max_num_seqs}){auto}")


def _gpu_memory(settings: Settings) -> DeviceMemory | None:
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(0)
    usable = min(free, int(total * settings.gpu_memory_utilization))
    return DeviceMemory(f"cuda:0 ({torch.cuda.get_device_name(0)})", free, total, usable)
