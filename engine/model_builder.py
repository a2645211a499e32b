"""Build what an engine needs from an EngineConfig: the resolved model, its weights on the device,
the tokenizer, the context length, and a ModelRunner with a KV cache sized from the memory budget.

On CUDA the budget is what `gpu_memory_utilization` of the card leaves after the weights and the
peak of a profiling forward pass (the largest batch the scheduler can form), or `kv_cache_gib`.
`load_format="dummy"` needs only config.json: random weights, and a stand-in tokenizer (token-id
prompts only) when the directory has no tokenizer.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from hearth.engine.attention import AttentionMetadata
from hearth.engine.catalog import ResolvedModel, resolve_model, verify
from hearth.engine.config import DEFAULT_CPU_KV_CACHE_GIB, EngineConfig
from hearth.engine.cpu_precision import precision_label, resolve_cpu_precision
from hearth.engine.cuda_graphs import MAX_VERIFY_ROWS
from hearth.engine.fim import FimSpec, model_fim
from hearth.engine.kv_cache import resolve_kv_cache_dtype
from hearth.engine.layers.linear import GGUFLinear
from hearth.engine.loader import LoadedSource, load_hf_config, load_model_source
from hearth.engine.memory_check import (
    AUTO,
    DeviceMemory,
    MemoryNeed,
    check_fits,
    choose_max_model_len,
    host_memory,
    min_auto_kv_bytes,
    weight_bytes,
)
from hearth.engine.model_config import ModelConfig
from hearth.engine.model_runner import (
    ModelRunner,
    RunnerLimits,
    make_attention_backend,
    resolve_dtype,
)
from hearth.engine.models.registry import model_class
from hearth.engine.phase_timer import PhaseTimer
from hearth.engine.progress import progress_bar
from hearth.engine.speculative.config import SpeculativeConfig
from hearth.kernels import cpu_native

logger = logging.getLogger(__name__)
_GIB = 1 << 30
# The KV cache of a model whose decode steps run in the native CPU kernels' one call
# (engine/models/native_decode.py), under kv_cache_dtype "auto": float16, as llama.cpp keeps it
# (attention reads half the bytes; held-out perplexity in docs/benchmarks.md). Models the native
# step does not cover keep the model dtype (their torch attention would cast it every step).
NATIVE_KV_DTYPE = torch.float16


@dataclass
class BuiltModel:
    name: str
    tokenizer: object
    model_config: ModelConfig
    max_model_len: int
    runner: ModelRunner
    quantization: str | None = None
    fim: FimSpec | None = None
    resolved: ResolvedModel | None = None  # where the files are (the KV tiers' model identity)
    speculative: SpeculativeConfig | None = None  # the config's, K filled in for the device
    # what the weights multiply in, e.g. "float32+kept-blocks+bf16-gemv" (precision_label):
    # part of the KV tiers' model identity, and of the build's log line
    precision: str = ""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was asked for, but no CUDA GPU is available; "
                             "use 'cpu'")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r} was asked for, but only "
                             f"{torch.cuda.device_count()} GPU(s) are visible (cuda:0.."
                             f"cuda:{torch.cuda.device_count() - 1}); check CUDA_VISIBLE_DEVICES")
    return torch.device(device)


def build_model(config: EngineConfig, progress: bool = True, comm=None) -> BuiltModel:
    """`comm`: a tensor-parallel worker's communicator (engine/distributed/workers.py); the
    driver (rank 0) starts its workers here when tensor_parallel_size > 1."""
    if config.tensor_parallel_size > 1 and comm is None:
        return _build_driver(config, progress)
    timer = PhaseTimer()
    resolved = resolve_model(config.model)
    if config.load_format != "dummy":
        verify(resolved)
        timer.lap("checksum")
    config = resolve_cpu_precision(config, resolved.format, resolved.path,
                                   resolve_device(config.device).type)
    source = _load_source(resolved, config)
    timer.lap("header and tokenizer")
    full_config, runner_config, share = source.config, source.config, None
    device = resolve_device(config.device)
    if comm is not None:
        from hearth.engine.distributed import sharded_build

        device = resolve_device(str(sharded_build.rank_device(config, device, comm.rank)))
        share = sharded_build.rank_share(source, comm)
        source, runner_config = share.source, share.runner_config
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # streams, events, graphs and pinned copies on this card
    dtype = resolve_dtype(config.dtype, device)
    kept_float32 = config.gguf_keep_quantized and device.type == "cpu" and dtype == torch.float32
    # the native CPU kernels multiply the kept blocks (EngineConfig.cpu_native)
    native = kept_float32 and config.cpu_native and comm is None and cpu_native.available()
    # the CPU int4 GEMV's and int8 LM head's input dtype in a float32 model
    # (EngineConfig.cpu_bf16_gemv), else None; the native kernels take float32
    gemv_dtype = torch.bfloat16 if kept_float32 and config.cpu_bf16_gemv and not native else None
    if config.speculative is not None:  # K for this device and precision when none was given
        config = dataclasses.replace(config, speculative=config.speculative.for_device(
            device.type, dtype == torch.float32 and gemv_dtype is None and not native))
    kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, dtype, device)  # before the weights
    if kept_float32 and gemv_dtype is None and not native:
        logger.warning(
            "gguf_keep_quantized on CPU in float32 keeps the exact reference path, which "
            "dequantizes every layer at every step (about 10x slower than float32 weights); "
            "with dtype bfloat16 the GGUF's 4-bit linears run torch's int4 GEMV instead")
    max_model_len = _max_model_len(config, source)  # "auto": the model's, until the budget is known
    check_fits(source.name, _memory_need(config, source, resolved, dtype, kv_dtype,
                                         max_model_len), _device_memory(device, config))
    try:
        model = _instantiate(source, config, device, dtype, gemv_dtype, native, progress)
    except ValueError as e:  # name the file and the architecture with any loading error
        raise ValueError(f"{resolved.path} ({source.config.architecture}): {e}") from e
    timer.lap("weights")
    if (native and config.kv_cache_dtype == "auto"
            and getattr(model, "native_decoder", None) is not None):
        kv_dtype = NATIVE_KV_DTYPE  # the memory check above counted float32: an upper bound
    limits = _limits(config, max_model_len, comm is not None)
    if comm is not None:
        model = sharded_build.wrap_model(model, share, comm)
    budget = _kv_budget(config, model, limits)
    if config.max_model_len == AUTO:
        max_model_len = _auto_max_model_len(config, source, kv_dtype, budget, device)
        limits = _limits(config, max_model_len, comm is not None)
    num_blocks = _num_kv_blocks(config, source.config, budget, limits, kv_dtype)
    runner_args = (config.block_size, num_blocks, config.seed, limits)
    if comm is not None:
        runner = sharded_build.make_runner(model, runner_config, runner_args, kv_dtype, comm)
    else:
        runner = ModelRunner(model, runner_config, *runner_args, kv_cache_dtype=kv_dtype)
    timer.lap("KV cache and runner")
    precision = precision_label(dtype, config.gguf_keep_quantized, gemv_dtype, native)
    kv_note = "" if kv_dtype == dtype else f", KV cache {str(kv_dtype).removeprefix('torch.')}"
    logger.info("built %s on %s (%s%s) in %s", source.name, device, precision, kv_note,
                timer.summary())
    return BuiltModel(source.name, source.tokenizer, full_config, max_model_len, runner,
                      source.quantization, _fim(resolved, source.tokenizer, full_config),
                      resolved, config.speculative, precision)


def _build_driver(config: EngineConfig, progress: bool) -> BuiltModel:
    """Rank 0 of tensor parallelism: workers started, then this rank's share built with them."""
    from hearth.engine.distributed import sharded_build

    comm, workers = sharded_build.start_driver(config, resolve_device(config.device),
                                               run_tp_worker)
    try:
        built = build_model(config, progress, comm)
    except BaseException:
        workers.stop(timeout_s=5)
        comm.shutdown()
        raise
    built.runner.attach_workers(workers)
    return built


def run_tp_worker(config: EngineConfig, comm_config) -> None:
    """A tensor-parallel worker process's life (engine/distributed/workers.py starts it): its
    share of the model, then the driver's steps until STOP."""
    from hearth.engine.distributed.communicator import TorchCommunicator
    from hearth.engine.distributed.tp_runner import worker_loop

    comm = TorchCommunicator(comm_config)
    try:
        worker_loop(build_model(config, progress=False, comm=comm).runner, comm)
    finally:
        comm.shutdown()


def _limits(config: EngineConfig, max_model_len: int, eager: bool = False) -> RunnerLimits:
    """`eager`: tensor parallelism runs without CUDA graphs."""
    sched = config.scheduler_config(max_model_len)
    spec = config.speculative
    verify_tokens = spec.num_speculative_tokens + 1 if spec else 0
    # verification graphs up to the speculator's switch-off, within MAX_VERIFY_ROWS rows
    verify_max_seqs = (min(sched.max_num_seqs, spec.disable_by_batch_size,
                           max(MAX_VERIFY_ROWS // verify_tokens, 1)) if spec else 0)
    return RunnerLimits(sched.max_num_seqs, sched.max_num_batched_tokens, max_model_len,
                        config.enforce_eager or eager, verify_tokens, verify_max_seqs)


def _auto_max_model_len(config: EngineConfig, source: LoadedSource, kv_dtype: torch.dtype,
                        budget: float, device: torch.device) -> int:
    """max_model_len "auto" (engine/memory_check.py's rule), logged with its numbers."""
    if config.kv_cache_gib is not None:
        budget_from = f"kv_cache_gib={config.kv_cache_gib}"
    elif device.type == "cuda":
        budget_from = (f"{config.gpu_memory_utilization:g} of {device} after the weights and "
                       "activations")
    else:
        budget_from = f"the CPU default kv_cache_gib={DEFAULT_CPU_KV_CACHE_GIB}"
    choice = choose_max_model_len(
        int(budget), source.config.kv_bytes_per_token(kv_dtype.itemsize), config.max_num_seqs,
        config.block_size, source.max_model_len, budget_from)
    logger.warning("%s", choice.describe())  # shown at the default log level
    return choice.max_model_len


def _fim(resolved, tokenizer, model_config: ModelConfig) -> FimSpec | None:
    """The model's FIM tokens (engine/fim.py), as the catalogue entry overrides them."""
    spec = resolved.spec
    family, order = (spec.fim, spec.fim_order) if spec is not None else (None, None)
    try:
        return model_fim(tokenizer, model_config.vocab_size, family, order)
    except ValueError as e:
        raise ValueError(f"model {resolved.name!r}: {e}") from None


def _load_source(resolved, config: EngineConfig) -> LoadedSource:
    """Dummy weights of an HF directory need only its config.json (no safetensors)."""
    if config.load_format != "dummy" or resolved.format != "hf":
        return load_model_source(resolved, config.gguf_keep_quantized)
    model_config = load_hf_config(resolved.path)
    tokenizer = _tokenizer_for_dummy(resolved.path, model_config)
    eos_ids = tuple(dict.fromkeys((*model_config.eos_token_ids, *tokenizer.eos_token_ids)))
    model_config = dataclasses.replace(model_config, eos_token_ids=eos_ids)
    return LoadedSource(resolved.name, model_config, tokenizer, lambda: iter(()),
                        model_config.max_position_embeddings)


def _memory_need(config: EngineConfig, source: LoadedSource, resolved, dtype: torch.dtype,
                 kv_dtype: torch.dtype, max_model_len: int) -> MemoryNeed:
    model_config = source.config
    kept = None
    if resolved.format == "gguf" and config.gguf_keep_quantized and config.load_format != "dummy":
        kept = resolved.path.stat().st_size
    weights = weight_bytes(model_config, dtype.itemsize, kept)
    per_token = model_config.kv_bytes_per_token(kv_dtype.itemsize)
    if config.kv_cache_gib is not None:
        kv, what = int(config.kv_cache_gib * _GIB), f"kv_cache_gib={config.kv_cache_gib}"
    elif config.num_kv_blocks is not None:
        kv, what = config.num_kv_blocks * config.block_size * per_token, "num_kv_blocks"
    elif config.max_model_len == AUTO:
        kv = min_auto_kv_bytes(per_token, config.max_num_seqs, max_model_len)
        what = f"max_model_len auto's shortest context at max_num_seqs={config.max_num_seqs}"
    elif resolve_device(config.device).type == "cpu":  # the cache _num_kv_blocks will allocate
        kv = int(DEFAULT_CPU_KV_CACHE_GIB * _GIB)
        what = f"the CPU default kv_cache_gib={DEFAULT_CPU_KV_CACHE_GIB}"
    else:
        tokens = max_model_len
        if model_config.kv_window is not None:
            tokens = min(tokens, model_config.kv_window + 2048)
        kv, what = tokens * per_token, f"one {tokens}-token sequence"
    label = "kept-quantized GGUF blocks" if kept else f"{str(dtype).removeprefix('torch.')} weights"
    if model_config.quantization is not None and not kept:
        label = f"{model_config.quantization.method} weights"
    return MemoryNeed(weights, kv, label, what)


def _device_memory(device: torch.device, config: EngineConfig) -> DeviceMemory | None:
    if device.type != "cuda":
        return host_memory()
    free, total = torch.cuda.mem_get_info(device)
    usable = min(free, int(total * config.gpu_memory_utilization))
    return DeviceMemory(f"{device} ({torch.cuda.get_device_name(device)})", free, total, usable)


def _tokenizer_for_dummy(path, model_config: ModelConfig):
    if (path / "tokenizer.json").is_file():
        from hearth.engine.tokenizer import Tokenizer

        return Tokenizer.from_hf_dir(path)
    return TokenIdTokenizer(model_config.eos_token_ids, model_config.bos_token_id)


class TokenIdTokenizer:
    """Stand-in tokenizer for dummy-weight benchmarks of a bare config.json: prompts must be token
    ids, and decoding yields no text (the token ids are in every output)."""

    chat_template = None

    def __init__(self, eos_token_ids: tuple[int, ...], bos_token_id: int | None) -> None:
        self.eos_token_ids = tuple(eos_token_ids)
        self.bos_token_id = bos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise ValueError("this dummy-weight model has no tokenizer.json: pass prompts as token ids")

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""

    def apply_chat_template(self, *args, **kwargs):
        raise ValueError("this dummy-weight model has no tokenizer.json: no chat template")

    @property
    def all_special_ids(self) -> list[int]:
        return list(self.eos_token_ids)


def _instantiate(source, config: EngineConfig, device, dtype, gemv_dtype: torch.dtype | None,
                 native: bool, progress: bool) -> torch.nn.Module:
    cls = model_class(source.config)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if device.type == "cpu":  # see _no_linear_init
            with torch.device(device), _no_linear_init():
                model = cls(source.config)
        else:
            with torch.device("meta"):  # no memory and no random init until the weights arrive
                model = cls(source.config)
    finally:
        torch.set_default_dtype(default_dtype)
    if device.type != "cpu":  # built on the meta device: allocate, then the buffers it lacks
        model = model.to_empty(device=device)
        model.tie_weights()  # to_empty gives each module its own tensor
        _rebuild_buffers(model, source.config, device)
    if gemv_dtype is not None or native:  # before the weights: GGUFLinear packs them when filled
        for module in model.modules():
            if isinstance(module, GGUFLinear):
                module.gemv_dtype = gemv_dtype or module.gemv_dtype
                module.native = native
    if config.load_format == "dummy":
        model.init_dummy(config.seed)
    else:
        bar_args = dict(total=None, desc="Loading weights", unit="tensor", enable=progress)
        with progress_bar(**bar_args) as bar:
            model.load_weights(_counted(source.weights(), bar))
        prepare_head = getattr(model, "prepare_cpu_head", None)
        if prepare_head is not None and prepare_head(gemv_dtype, native):
            logger.info("LM head: int8 rows for decode on the CPU (the file's head is %s)",
                        source.config.quantization.lm_head_type)
    prepare_native = getattr(model, "prepare_native_decode", None)
    if native and prepare_native is not None and prepare_native():
        logger.info("decode steps of up to %d new tokens: one native call each "
                    "(kernels/cpu_native.py)", cpu_native.GEMV_MAX_ROWS)
    return model.eval()


_init_lock = threading.Lock()
_init_skips = 0
_linear_reset = torch.nn.Linear.reset_parameters


@contextlib.contextmanager
def _no_linear_init() -> Iterator[None]:
    """nn.Linear without its random init while a CPU model is built in place.

    On the CPU the model is built on its device, not on the meta device: the first meta tensor
    imports torch._meta_registrations and sympy (0.46 s of a 5 s cold start), and untouched
    CPU memory costs nothing until the weights are written. nn.Linear's kaiming init would touch
    it all for values the loader overwrites, so it is skipped here (counted: nested or
    concurrent builds restore it once the last one ends)."""
    global _init_skips
    with _init_lock:
        _init_skips += 1
        torch.nn.Linear.reset_parameters = lambda self: None
    try:
        yield
    finally:
        with _init_lock:
            _init_skips -= 1
            if _init_skips == 0:
                torch.nn.Linear.reset_parameters = _linear_reset


def _rebuild_buffers(model: torch.nn.Module, config: ModelConfig, device) -> None:
    """Rotary tables are buffers, never materialised on the meta device: compute them now."""
    from hearth.engine.layers.rotary import RotaryEmbedding

    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.rebuild(device)


def _counted(weights, bar):
    for item in weights:
        bar.update(1)
        yield item


def _max_model_len(config: EngineConfig, source) -> int:
    if config.max_model_len is None or config.max_model_len == AUTO:
        return source.max_model_len
    if config.max_model_len > source.config.max_position_embeddings:
        raise ValueError(
            f"max_model_len {config.max_model_len} exceeds the model's maximum of "
            f"{source.config.max_position_embeddings} positions"
        )
    return config.max_model_len


def _kv_budget(config: EngineConfig, model, limits: RunnerLimits) -> float:
    """Bytes for the KV cache: kv_cache_gib, what the GPU has left after a profiling pass, or the
    CPU default."""
    device = next(model.parameters()).device
    if config.kv_cache_gib is not None:
        return config.kv_cache_gib * _GIB
    if device.type == "cuda" and config.num_kv_blocks is None:
        return _cuda_kv_budget(config, model, limits)
    return DEFAULT_CPU_KV_CACHE_GIB * _GIB


def _num_kv_blocks(config, model_config: ModelConfig, budget: float, limits: RunnerLimits,
                   kv_dtype: torch.dtype) -> int:
    """Blocks of `kv_dtype` the budget holds: an fp8 cache gets twice the blocks of bf16."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    max_model_len = limits.max_model_len
    bytes_per_block = config.block_size * model_config.kv_bytes_per_token(kv_dtype.itemsize)
    num_blocks = int(budget // bytes_per_block)
    held = max_model_len
    if model_config.kv_window is not None:  # a sequence holds its window and one chunk at most
        held = min(held, model_config.kv_window + limits.max_num_batched_tokens + config.block_size)
    min_blocks = (held + config.block_size - 1) // config.block_size
    if num_blocks < min_blocks:
        raise ValueError(
            f"the KV-cache budget holds {num_blocks} blocks of {config.block_size} tokens, fewer "
            f"than one sequence of max_model_len {max_model_len} needs ({min_blocks}): raise "
            "kv_cache_gib / gpu_memory_utilization or lower max_model_len"
        )
    return num_blocks


def _cuda_kv_budget(config: EngineConfig, model, limits: RunnerLimits) -> int:
    """total * utilization - (weights + activation peak of a profiling pass) - non-torch memory
    (CUDA context, cuBLAS workspaces) - a reserve for the decode CUDA graphs' pool."""
    device = next(model.parameters()).device
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    _profile_forward(model, limits)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    non_torch = total - free - torch.cuda.memory_reserved(device)
    graph_reserve = 0 if limits.enforce_eager else _GIB // 2
    budget = total * config.gpu_memory_utilization - peak - non_torch - graph_reserve
    logger.info("KV budget %.2f GiB (peak %.2f GiB, non-torch %.2f GiB)", budget / _GIB,
                peak / _GIB, non_torch / _GIB)
    return int(budget)


@torch.inference_mode()
def _profile_forward(model, limits: RunnerLimits) -> None:
    """One forward over the largest token budget, logits for the most sampled rows. Nothing is
    written (slot -1) into a one-block scratch cache; every block-table entry points at it."""
    cfg: ModelConfig = model.config
    param = next(model.parameters())
    device = param.device
    num_tokens = limits.max_num_batched_tokens
    seq_len = min(limits.max_model_len, num_tokens)
    lens = [seq_len] * (num_tokens // seq_len)
    if num_tokens % seq_len:
        lens.append(num_tokens % seq_len)
    cache = torch.zeros((1, 16, cfg.num_kv_heads, cfg.head_dim), dtype=param.dtype, device=device)
    kv_caches = [(cache, cache)] * cfg.num_layers
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        block_tables=torch.zeros((len(lens), -(-seq_len // 16)), dtype=torch.int32, device=device),
        query_lens_cpu=lens, seq_lens_cpu=lens, max_query_len=max(lens), max_seq_len=max(lens),
    )
    positions = torch.cat([torch.arange(n, device=device) for n in lens])
    input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    hidden = model(input_ids, positions, kv_caches, meta, make_attention_backend(device))
    rows = min(limits.max_num_seqs, num_tokens)
    model.compute_logits(hidden[:rows]).float().softmax(-1)  # the sampler's float32 logits
