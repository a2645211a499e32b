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

from hearth.engine.config import DEVICES, DTYPES, KV_CACHE_DTYPES, EngineConfig

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
    max_model_len: int | str | None = None  # "auto": sized from the KV budget at load
    max_num_seqs: int = 64
    kv_cache_gib: float | None = None
    kv_cache_dtype: str = "auto"
    gpu_memory_utilization: float = 0.9
    device: str = "auto"
    dtype: str = "auto"
    gguf_keep_quantized: bool = False  # GGUF linears from their blocks (CPU bf16: int4 GEMV)
    max_queued_requests: int = 256  # requests admitted beyond max_num_seqs before 429
    max_request_body_mib: float = 8.0  # larger bodies: 413 unread (appliance/body_limit.py)
    allowed_origins: tuple[str, ...] = ()  # CORS; empty: no CORS headers at all
    allowed_hosts: tuple[str, ...] = ()  # Host headers accepted besides localhost names
    shutdown_timeout: float = 30.0  # SIGTERM: seconds in-flight requests get to finish
    tool_call_parser: str = "auto"  # auto: from the chat template
    reasoning_parser: str = "auto"  # auto: <think> blocks when the chat template has them
    no_ui: bool = False
    log_level: str = "info"
    access_log: bool = False
    engine: EngineConfig = field(init=False, repr=False, compare=False)  # from the fields above

    def __post_init__(self) -> None:
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
        ))


@dataclass(frozen=True)
class _Option:
    name: str  # the Settings field
    parse: Callable[[str], Any]  # one value from a string (flag or environment)
    help: str
    list: bool = False  # several values: repeated words on the command line, commas in the env
    flag: bool = False  # a switch: `--no-ui`; in the env 1/0, true/false, yes/no
    metavar: str | None = None


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
    _Option("device", _choice(DEVICES), "device (auto: cuda when available)"),
    _Option("dtype", _choice(DTYPES), "weights and activations dtype"),
    _Option(
        "gguf_keep_quantized",
        _bool,
        "run a GGUF model's linears from its quantized blocks instead of dequantizing at load "
        "(less memory; on CPU with --dtype bfloat16, Q4 weights take the int4 GEMV: ~2x decode)",
        flag=True,
    ),
    _Option(
        "max_queued_requests",
        _int,
        "requests that may wait beyond --max-num-seqs; past that, 429 with Retry-After",
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
                nargs="+" if option.list else None,
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
