"""EngineConfig: every engine setting in one frozen dataclass, validated once.

Budgets that depend on the model (how many KV blocks fit) are derived by the model runner from the
model's shape and the memory budget here; the scheduler only sees `SchedulerConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass

from hearth.engine.speculative.config import SpeculativeConfig

DEVICES = ("auto", "cpu", "cuda")  # auto: cuda when available; also "cuda:N" for one card
TP_BACKENDS = ("auto", "gloo", "nccl")  # auto: nccl on CUDA, gloo on CPU
DTYPES = ("auto", "float32", "bfloat16", "float16")
LOAD_FORMATS = ("auto", "dummy")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # auto: the model dtype; fp8: e4m3, CUDA only
DEFAULT_CPU_KV_CACHE_GIB = 1.0


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    block_size: int = 16
    enable_chunked_prefill: bool = True
    # longrope models: the length past which a sequence's keys are recomputed with the long
    # factors (RopeConfig.regime_switch); None for every other model
    rope_switch: int | None = None
    # While every running sequence decodes (a CUDA-graph step), new arrivals wait up to this
    # many steps for company, so that a trickle of requests does not turn step after step into
    # an eager mixed step (engine/scheduler.py, `_hold_admissions`). 0: admit at once.
    admission_hold_steps: int = 0

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        steps = self.admission_hold_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"admission_hold_steps must be an integer >= 0, got {steps!r}")


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # catalogue name, HF directory or .gguf path; None: the default model
    device: str = "auto"  # "auto" picks cuda when available
    dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu (unless cpu_fast_path)
    # None: the model's own limit (capped by the catalogue); "auto": the longest context the KV
    # budget serves max_num_seqs sequences at (engine/memory_check.py, picked at load)
    max_model_len: int | str | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None  # None: max(2048, max_model_len) without chunking
    block_size: int = 16
    kv_cache_gib: float | None = None  # absolute KV budget; None: from gpu_memory_utilization
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None  # exact block count (tests); overrides the memory budget
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    load_format: str = "auto"
    seed: int = 0  # for dummy weights and unseeded sampling
    enforce_eager: bool = False  # no CUDA graphs
    # Overlap the next step's scheduling and input building with this step's GPU run (sampled
    # ids fed back on the device). None: on for CUDA, off on CPU.
    async_scheduling: bool | None = None
    gguf_keep_quantized: bool = False  # GGUF: run the linears from their blocks (less memory)
    # dtype "auto" on a CPU: bfloat16 + kept Q4 blocks where that is fast and close
    # (engine/cpu_precision.py). `hearth serve` turns it on; off here, the exact float32 path.
    cpu_fast_path: bool = False
    # A float32 model on a CPU with kept Q4 blocks: the int4 GEMV and the int8 LM head take their
    # inputs rounded to bf16, everything else (prompts' matmuls included) stays float32: the CPU
    # default where bf16 matmuls are emulated (AVX2, engine/cpu_precision.py). False: float32 with
    # kept blocks is the exact reference path.
    cpu_bf16_gemv: bool = False
    # A float32 CPU model with kept Q4_0 / Q4_1 blocks: the native kernels (kernels/cpu_native.py,
    # built with the system C compiler on first use) multiply the repacked blocks, a step of up to
    # 32 new tokens of a plain Llama decoder runs in one native call, the int8 LM head's rows
    # too, and the KV cache is float16 (kv_cache_dtype "auto"). Takes precedence over
    # cpu_bf16_gemv. Off, or without a C compiler: torch's kernels as above.
    cpu_native: bool = True
    kv_cache_dtype: str = "auto"  # fp8: half the bytes per cached token (engine/kv_cache.py)
    # Grammar-constrained decoding (engine/grammar.py). False: no grammar compiler and no grammar
    # hook in the step at all (bench/structured.py measures the hook's cost against this).
    structured_output: bool = True
    # Speculative decoding (engine/speculative/): None = off; "ngram", "draft", a dict of
    # SpeculativeConfig fields or a SpeculativeConfig (normalised to one here).
    speculative: SpeculativeConfig | None = None
    # Tensor parallelism (engine/distributed/): one worker process per extra rank, on the cards
    # after `device` (cuda:0, cuda:1, ...), or on `tensor_parallel_devices` (e.g. two ranks
    # sharing one card in a test). Steps run synchronously and eagerly when > 1.
    tensor_parallel_size: int = 1
    tensor_parallel_backend: str = "auto"
    tensor_parallel_devices: tuple[str, ...] = ()
    # Tiers below the device's prefix cache (engine/kv_tiers/): KV blocks on disk, kept across
    # restarts (None: off) within `prefix_cache_gib`, and `kv_offload_gib` of host RAM that
    # blocks evicted from the device go to first (0: off).
    prefix_cache_dir: str | None = None
    prefix_cache_gib: float = 10.0
    kv_offload_gib: float = 0.0
    admission_hold_steps: int = 0  # SchedulerConfig.admission_hold_steps

    def __post_init__(self) -> None:
        object.__setattr__(self, "speculative", SpeculativeConfig.parse(self.speculative))
        if not is_device_name(self.device):
            raise ValueError(f"device must be one of {', '.join(DEVICES)} or cuda:N (a GPU "
                             f"index); got {self.device!r}")
        self._check_tensor_parallel()
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(
                f"load_format must be one of {LOAD_FORMATS}; got {self.load_format!r}"
            )
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; "
                             f"got {self.kv_cache_dtype!r}")
        if self.kv_cache_dtype != "auto" and self.device == "cpu":
            raise ValueError(fp8_needs_cuda_message(self.kv_cache_dtype))
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128; got {self.block_size}")
        if self.kv_cache_gib is not None and not self.kv_cache_gib > 0:
            raise ValueError(f"kv_cache_gib must be > 0, got {self.kv_cache_gib}")
        self._check_tiers()
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.max_model_len == "auto" and self.num_kv_blocks is not None:
            raise ValueError("max_model_len 'auto' sizes the context from the KV-cache budget; "
                             "it cannot be combined with num_kv_blocks")
        for name in ("max_model_len", "max_num_batched_tokens", "num_kv_blocks"):
            value = getattr(self, name)
            if name == "max_model_len" and value == "auto":
                continue
            if value is not None and (not isinstance(value, int) or value < 1):
                also = " or 'auto'" if name == "max_model_len" else ""
                raise ValueError(f"{name} must be a positive integer{also}, got {value!r}")
        if not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be a positive integer, got {self.max_num_seqs!r}")

    def _check_tensor_parallel(self) -> None:
        tp = self.tensor_parallel_size
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {tp!r}")
        if self.tensor_parallel_backend not in TP_BACKENDS:
            raise ValueError(f"tensor_parallel_backend must be one of {', '.join(TP_BACKENDS)}; "
                             f"got {self.tensor_parallel_backend!r}")
        devices = self.tensor_parallel_devices
        if devices and (len(devices) != tp or not all(map(is_device_name, devices))):
            raise ValueError(f"tensor_parallel_devices must name {tp} devices (cpu, cuda, "
                             f"cuda:N), one per rank; got {devices!r}")
        if tp > 1 and self.speculative is not None:
            raise ValueError("speculative decoding is not supported with tensor_parallel_size > 1 "
                             "yet; use one of the two")
        if tp > 1 and self.max_model_len == "auto":
            raise ValueError("max_model_len 'auto' is not supported with tensor_parallel_size > 1 "
                             "yet; give a number")
        if tp > 1 and self.async_scheduling:
            raise ValueError("async_scheduling is not supported with tensor_parallel_size > 1; "
                             "leave it unset")

    def _check_tiers(self) -> None:
        if not self.prefix_cache_gib > 0:
            raise ValueError(f"prefix_cache_gib must be > 0, got {self.prefix_cache_gib}")
        if not self.kv_offload_gib >= 0:
            raise ValueError(f"kv_offload_gib must be >= 0, got {self.kv_offload_gib}")
        if self.prefix_cache_dir == "":
            raise ValueError("prefix_cache_dir must not be empty (leave it unset for no disk tier)")
        tiers = self.prefix_cache_dir is not None or self.kv_offload_gib > 0
        if tiers and self.tensor_parallel_size > 1:
            raise ValueError("prefix_cache_dir and kv_offload_gib are not supported with "
                             "tensor_parallel_size > 1 yet (each rank holds a share of the KV)")
        if tiers and not self.enable_prefix_caching:
            raise ValueError("prefix_cache_dir and kv_offload_gib extend the prefix cache: they "
                             "need enable_prefix_caching=True")

    def scheduler_config(self, max_model_len: int,
                         rope_switch: int | None = None) -> SchedulerConfig:
        """The scheduler's view, once the model's context length (and RoPE switch) is known."""
        budget = self.max_num_batched_tokens
        if budget is None:
            budget = 2048 if self.enable_chunked_prefill else max(2048, max_model_len)
        if not self.enable_chunked_prefill and budget < max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({budget}) must be >= max_model_len ({max_model_len}) "
                "when chunked prefill is off"
            )
        return SchedulerConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=budget,
            max_model_len=max_model_len,
            block_size=self.block_size,
            enable_chunked_prefill=self.enable_chunked_prefill,
            rope_switch=rope_switch,
            admission_hold_steps=self.admission_hold_steps,
        )


def is_device_name(device: object) -> bool:
    """auto, cpu, cuda, or cuda:N."""
    if device in DEVICES:
        return True
    if not isinstance(device, str) or not device.startswith("cuda:"):
        return False
    index = device.removeprefix("cuda:")
    return index.isdigit() and str(int(index)) == index


def fp8_needs_cuda_message(kv_cache_dtype: str) -> str:
    return (f"kv_cache_dtype={kv_cache_dtype!r} needs a CUDA GPU (compute capability 8.9 or "
            "newer); the CPU attention path keeps the cache in the model dtype: use "
            "kv_cache_dtype='auto'")
