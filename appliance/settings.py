"""Settings: every `hearth serve` option in one frozen dataclass, from flags and HEARTH_* variables.

Precedence: a command-line flag beats its environment variable (`--port` beats `HEARTH_PORT`), which
beats the default. The environment is read once, here. Each option is declared once in `_OPTIONS`;
the argparse flags, the environment variable names and `hearth serve --help` all come from it.
The engine's options are checked once, by building `Settings.engine` (an EngineConfig) when the
settings are made: a bad value fails before anything binds or loads.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from hearth.engine.config import (
    DEVICES,
    DTYPES,
    KV_CACHE_DTYPES,
    LOAD_FORMATS,
    EngineConfig,
    is_device_name,
)
from hearth.engine.speculative import SPECULATIVE_METHODS, SpeculativeConfig

ENV_PREFIX = "HEARTH_"
_LOG_LEVELS = ("debug", "info", "warning", "error")
# appliance/serving/tool_parsers.py and reasoning.py: their families and aliases (a test checks)
TOOL_CALL_PARSERS = ("auto", "none", "hermes", "llama3_json", "mistral", "qwen", "qwen3",
                     "llama3", "llama")
REASONING_PARSERS = ("auto", "none", "think", "qwen3", "deepseek_r1", "deepseek-r1")


@dataclass(frozen=True)
class Settings:
    model: str | None = None  # catalogue name or path; None: the embedded default model
    served_model_name: tuple[str, ...] = ()  # names clients use; empty: the engine's model name
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    api_keys_file: str | None = None  # named keys with quotas (appliance/auth/keys.py)
    ssl_certfile: str | None = None  # TLS: both files, or neither
    ssl_keyfile: str | None = None
    state_dir: str | None = None  # writable state (audit log); the installer's /var/lib/hearth
    audit_log_max_mib: float = 64.0  # the audit log rotates at this size (5 files kept)
    log_prompts: bool = False  # the audit log also records prompt text
    max_model_len: int | str | None = None  # "auto": sized from the KV budget at load
    max_num_seqs: int = 64
    kv_cache_gib: float | None = None
    kv_cache_dtype: str = "auto"
    gpu_memory_utilization: float = 0.9
    device: str = "auto"
    dtype: str = "auto"
    tensor_parallel_size: int = 1  # one worker process per extra GPU (engine/distributed/)
    data_parallel_size: int = 1  # engine replicas, one per GPU, behind one router
    gguf_keep_quantized: bool = False  # GGUF linears from their blocks (CPU bf16: int4 GEMV)
    load_format: str = "auto"  # dummy: random weights of the model's config (benchmarks)
    speculative: str | None = None  # ngram | draft; None: no speculative decoding
    num_speculative_tokens: int | None = None  # None: 3 on a CPU in 16-bit, else 4
    draft_model: str | None = None
    speculative_disable_by_batch_size: int = 8
    prefix_cache_dir: str | None = None  # KV blocks of cached prefixes on disk, across restarts
    prefix_cache_gib: float = 10.0  # the disk tier's size budget (LRU)
    kv_offload_gib: float = 0.0  # host RAM for blocks evicted from the device; 0: off
    max_queued_requests: int = 256  # requests admitted beyond max_num_seqs before 429
    admission_hold_steps: int = 0  # new arrivals wait up to N decode steps for company
    max_request_body_mib: float = 8.0  # larger bodies: 413 unread (appliance/body_limit.py)
    allowed_origins: tuple[str, ...] = ()  # CORS; empty: no CORS headers at all
    allowed_hosts: tuple[str, ...] = ()  # Host headers accepted besides localhost names
    shutdown_timeout: float = 30.0  # SIGTERM: seconds in-flight requests get to finish
    tool_call_parser: str = "auto"  # auto: from the chat template
    reasoning_parser: str = "auto"  # auto: <think> blocks when the chat template has them
    # the engine in its own process (appliance/engine_process.py): auto = on for a CUDA device
    engine_process: str = "auto"
    no_ui: bool = False
    log_level: str = "info"
    access_log: bool = False
    engine: EngineConfig = field(init=False, repr=False, compare=False)  # from the fields above

    def __post_init__(self) -> None:
        if isinstance(self.engine_process, bool):  # Settings(engine_process=True) in code
            object.__setattr__(self, "engine_process", "on" if self.engine_process else "off")
        if self.engine_process not in ENGINE_PROCESS_CHOICES:
            raise ValueError(f"engine_process must be one of {', '.join(ENGINE_PROCESS_CHOICES)}"
                             f", got {self.engine_process!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {self.max_queued_requests}")
        if not self.shutdown_timeout >= 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}")
        if self.log_level not in _LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(_LOG_LEVELS)}")
        for name, choices in (("tool_call_parser", TOOL_CALL_PARSERS),
                              ("reasoning_parser", REASONING_PARSERS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (leave it unset to disable auth)")
        self._check_security_files()
        object.__setattr__(self, "engine", EngineConfig(
            model=self.model,
            device=self.device,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            kv_cache_gib=self.kv_cache_gib,
            kv_cache_dtype=self.kv_cache_dtype,
            gpu_memory_utilization=self.gpu_memory_utilization,
            gguf_keep_quantized=self.gguf_keep_quantized,
            cpu_fast_path=True,  # dtype auto on a CPU: engine/cpu_precision.py
            load_format=self.load_format,
            speculative=self._speculative_config(),
            tensor_parallel_size=self.tensor_parallel_size,
            prefix_cache_dir=self.prefix_cache_dir,
            prefix_cache_gib=self.prefix_cache_gib,
            kv_offload_gib=self.kv_offload_gib,
            admission_hold_steps=self.admission_hold_steps,
        ))
        if self.data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {self.data_parallel_size}")
        if self.data_parallel_size > 1 and self.tensor_parallel_size > 1:
            raise ValueError("choose --tensor-parallel-size or --data-parallel-size, not both "
                             "(docs/operations.md: which one fits your model)")

    def _speculative_config(self) -> SpeculativeConfig | None:
        if self.speculative is None:
            if self.draft_model is not None:
                raise ValueError("--draft-model is used by --speculative draft; add it")
            return None
        return SpeculativeConfig(
            method=self.speculative,
            num_speculative_tokens=self.num_speculative_tokens,
            draft_model=self.draft_model,
            disable_by_batch_size=self.speculative_disable_by_batch_size,
        )


    def _check_security_files(self) -> None:
        """A bad keys file or certificate stops the start here, with the reason."""
        if self.api_keys_file is not None:
            from hearth.appliance.auth.keys import load_keys

            load_keys(self.api_keys_file)
        if self.ssl_certfile is not None or self.ssl_keyfile is not None:
            from hearth.appliance.tls import check_tls_files  # cryptography: only when asked

            check_tls_files(self.ssl_certfile, self.ssl_keyfile)
        if self.log_prompts and self.state_dir is None:
            raise ValueError("--log-prompts writes to the audit log: set --state-dir too")

    @property
    def route_api_key(self) -> str | None:
        """The single key the routes check themselves; with a keys file the gate checks all."""
        return None if self.api_keys_file is not None else self.api_key


@dataclass(frozen=True)
class _Option:
    name: str  # the Settings field
    parse: Callable[[str], Any]  # one value from a string (flag or environment)
    help: str
    list: bool = False  # several values: repeated words on the command line, commas in the env
    flag: bool = False  # a switch: `--no-ui`; in the env 1/0, true/false, yes/no
    metavar: str | None = None
    optional: str | None = None  # the value of the flag given without one (`--engine-process`)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"must be an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"must be a number, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise ValueError(f"must be >= 1, got {value}")
    return value


def parse_max_model_len(text: str) -> int | str:
    return "auto" if text.strip().lower() == "auto" else _positive_int(text)


def _positive_float(text: str) -> float:
    value = _float(text)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"must be a positive number, got {text}")
    return value


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"must be true or false, got {text!r}")


ENGINE_PROCESS_CHOICES = ("auto", "on", "off")


def _engine_process(text: str) -> str:
    """auto | on | off; the words a switch takes (true/false, 1/0, yes/no) too."""
    lowered = text.strip().lower()
    return lowered if lowered in ENGINE_PROCESS_CHOICES else ("on" if _bool(lowered) else "off")


def _device(text: str) -> str:
    if not is_device_name(text):
        raise ValueError(f"must be one of {', '.join(DEVICES)} or cuda:N; got {text!r}")
    return text


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {text!r}")
        return text

    return parse


_OPTIONS = (
    _Option(
        "model",
        str,
        "model: catalogue name, HF directory or .gguf path (default: "
        "the embedded SmolLM2-135M-Instruct)",
        metavar="NAME|PATH",
    ),
    _Option(
        "served_model_name",
        str,
        "name(s) clients pass as `model` (default: the model's name)",
        list=True,
        metavar="NAME",
    ),
    _Option(
        "host", str, "address to bind; 0.0.0.0 exposes the server to the network", metavar="ADDR"
    ),
    _Option("port", _int, "port to bind (0: any free port)", metavar="PORT"),
    _Option(
        "api_key",
        str,
        "require `Authorization: Bearer KEY` on /v1, /tokenize, /detokenize "
        "(prefer the environment variable: flags show in `ps`)",
        metavar="KEY",
    ),
    _Option(
        "api_keys_file",
        str,
        "named API keys with quotas, endpoints and fair-share weights (TOML; edit with "
        "`hearth keys`; reloaded on SIGHUP). --api-key still works beside it, as key 'default'",
        metavar="FILE",
    ),
    _Option("ssl_certfile", str, "serve HTTPS with this PEM certificate (`hearth cert` makes "
            "one)", metavar="FILE"),
    _Option("ssl_keyfile", str, "the certificate's PEM private key", metavar="FILE"),
    _Option("state_dir", str, "writable state directory: the audit log goes to "
            "DIR/audit/audit.jsonl (the installer sets /var/lib/hearth)", metavar="DIR"),
    _Option("audit_log_max_mib", _positive_float, "rotate the audit log at this size "
            "(5 old files kept)", metavar="MIB"),
    _Option("log_prompts", _bool, "write prompt text into the audit log too (off: token "
            "counts only)", flag=True),
    _Option(
        "max_model_len",
        parse_max_model_len,
        "context length (default: the model's own); auto: the longest that fits --max-num-seqs "
        "sequences of average length in the KV cache (--kv-cache-gib or free GPU memory)",
        metavar="N|auto",
    ),
    _Option("max_num_seqs", _positive_int, "sequences the engine runs at once", metavar="N"),
    _Option(
        "kv_cache_gib",
        _positive_float,
        "absolute KV-cache budget in GiB (default: from --gpu-memory-utilization on CUDA)",
        metavar="G",
    ),
    _Option(
        "kv_cache_dtype",
        _choice(KV_CACHE_DTYPES),
        "KV-cache dtype: auto (the model dtype) or fp8 (e4m3, CUDA only: twice the cached tokens)",
    ),
    _Option(
        "gpu_memory_utilization", _positive_float, "fraction of GPU memory to use", metavar="F"
    ),
    _Option("device", _device, "device: auto (cuda when available), cpu, cuda, or cuda:N "
            "(the first card of the engine; tensor / data parallelism use the cards after it)",
            metavar="DEVICE"),
    _Option("tensor_parallel_size", _positive_int, "split the model over N GPUs (one worker "
            "process per extra card): for models that do not fit one card, or lowest latency",
            metavar="N"),
    _Option("data_parallel_size", _positive_int, "N engine replicas, one per GPU, behind one "
            "router (least work, prefix-cache affinity): throughput for models that fit one card",
            metavar="N"),
    _Option("dtype", _choice(DTYPES), "weights and activations dtype. auto: bfloat16 on CUDA; on "
            "a CPU with a GGUF of Q4_0/Q4_1 linears, the blocks kept for the int4 GEMV (about 2x "
            "decode, perplexity +0.1-0.4%%): in bfloat16 with bf16 matrix instructions "
            "(AVX512-BF16, AMX), in float32 with bf16 GEMV inputs on AVX2; else float32. "
            "float32: the exact path"),
    _Option(
        "gguf_keep_quantized",
        _bool,
        "run a GGUF model's linears from its quantized blocks instead of dequantizing at load "
        "(less memory; on CPU with --dtype bfloat16, Q4 weights take the int4 GEMV: ~2x decode)",
        flag=True,
    ),
    _Option(
        "load_format",
        _choice(LOAD_FORMATS),
        "auto: the model's weights; dummy: random weights of its config (benchmarks only)",
    ),
    _Option(
        "speculative",
        _choice(SPECULATIVE_METHODS),
        "speculative decoding: ngram (prompt lookup, no extra model: code edits, quoting) or "
        "draft (a small model with the same tokenizer, --draft-model); greedy output unchanged",
    ),
    _Option(
        "num_speculative_tokens", _positive_int,
        "tokens proposed per step (K; default 3 on a CPU in 16-bit, the CPU default, else 4)",
        metavar="K"
    ),
    _Option(
        "draft_model", str, "the draft model of --speculative draft (name or path)",
        metavar="MODEL",
    ),
    _Option(
        "speculative_disable_by_batch_size",
        _positive_int,
        "steps with more running sequences than this do not speculate (it stops paying)",
        metavar="N",
    ),
    _Option(
        "prefix_cache_dir",
        str,
        "save the KV blocks of cached prefixes here and reuse them after a restart (keyed by the "
        "model's weights, dtype, KV dtype and block size; loaded lazily on a hit)",
        metavar="DIR",
    ),
    _Option(
        "prefix_cache_gib",
        _positive_float,
        "size budget of --prefix-cache-dir; least recently used blocks are deleted beyond it",
        metavar="G",
    ),
    _Option(
        "kv_offload_gib",
        _float,
        "host RAM for KV blocks evicted from the device, before the disk (0: off)",
        metavar="G",
    ),
    _Option(
        "max_queued_requests",
        _int,
        "requests that may wait beyond --max-num-seqs; past that, 429 with Retry-After",
        metavar="N",
    ),
    _Option(
        "admission_hold_steps",
        _int,
        "while the batch only decodes (a CUDA graph step), new requests wait up to N steps "
        "for others to join them, so a trickle of arrivals does not make step after step an "
        "eager mixed one (0: admit at once)",
        metavar="N",
    ),
    _Option(
        "max_request_body_mib",
        _positive_float,
        "largest request body in MiB; larger ones get 413 before they are read",
        metavar="MIB",
    ),
    _Option(
        "allowed_origins",
        str,
        "browser origins that get CORS headers, e.g. http://localhost:3000 (default: none)",
        list=True,
        metavar="ORIGIN",
    ),
    _Option(
        "allowed_hosts",
        str,
        "Host headers accepted besides localhost and the bound "
        "address (DNS-rebinding defence); '*' accepts any",
        list=True,
        metavar="HOST",
    ),
    _Option(
        "shutdown_timeout",
        _float,
        "on SIGTERM, seconds in-flight requests get to finish before they are aborted",
        metavar="SECONDS",
    ),
    _Option(
        "tool_call_parser",
        _choice(TOOL_CALL_PARSERS),
        "the format tool calls are read from in answers (tool_choice auto): hermes "
        "(<tool_call>, Qwen), llama3_json, mistral; auto: from the chat template",
    ),
    _Option(
        "reasoning_parser",
        _choice(REASONING_PARSERS),
        "return <think>...</think> as reasoning_content: think (Qwen3, DeepSeek-R1), none; "
        "auto: when the chat template has <think>",
    ),
    _Option("engine_process", _engine_process, "run the engine in a process of its own (the API "
            "server and the engine each get a GIL and a core; 2.3x the streamed tokens/s of an "
            "engine thread under load on an H100). auto: on for a CUDA device, off on a CPU; "
            "`--engine-process` alone: on", optional="on", metavar="{auto,on,off}"),
    _Option("no_ui", _bool, "serve the API only, without the browser UI", flag=True),
    _Option("log_level", _choice(_LOG_LEVELS), "log level"),
    _Option("access_log", _bool, "log every HTTP request", flag=True),
)


def env_name(option_name: str) -> str:
    return ENV_PREFIX + option_name.upper()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare every option as a flag. Defaults stay unset so that the environment can fill them."""
    defaults = Settings()
    for option in _OPTIONS:
        flag = "--" + option.name.replace("_", "-")
        default = getattr(defaults, option.name)
        shown = ", ".join(default) if option.list else default
        help_text = f"{option.help} [env {env_name(option.name)}; default: {shown or 'none'}]"
        if option.flag:
            parser.add_argument(
                flag, action="store_true", default=argparse.SUPPRESS, help=help_text
            )
        else:
            parser.add_argument(
                flag,
                type=_argparse_type(option),
                default=argparse.SUPPRESS,
                nargs="+" if option.list else ("?" if option.optional else None),
                const=option.optional,
                metavar=option.metavar,
                help=help_text,
            )


def _argparse_type(option: _Option) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return option.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = option.name  # argparse names the type in its error messages
    return parse


def settings_from(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """Flags over environment over defaults. Raises ValueError naming the bad variable or value."""
    values: dict[str, Any] = {}
    for option in _OPTIONS:
        if option.name in vars(args):
            value = getattr(args, option.name)
            values[option.name] = tuple(value) if option.list else value
        elif env_name(option.name) in environ:
            values[option.name] = _from_env(option, environ[env_name(option.name)])
    known = {f.name for f in fields(Settings) if f.init}
    return Settings(**{k: v for k, v in values.items() if k in known})


def _from_env(option: _Option, text: str) -> Any:
    try:
        if option.list:
            return tuple(option.parse(part.strip()) for part in text.split(",") if part.strip())
        return option.parse(text)
    except ValueError as exc:
        raise ValueError(f"{env_name(option.name)}: {exc}") from None
