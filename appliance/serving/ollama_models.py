"""Ollama's model routes, answered for the one served model: /api/version, /api/tags, /api/show
and /api/ps (shapes from Ollama's API documentation).

What clients read from them: GitHub Copilot's Ollama provider needs version ≥ 0.6.4, then takes
each model of /api/tags, and from /api/show its `capabilities` ("tools" for agent mode) and
`model_info["<architecture>.context_length"]`; Continue reads `num_ctx` from `parameters` and
offers fill-in-the-middle when `template` mentions `.Suffix`. Hearth's template is the model's own
jinja template (applied server-side); `template` here describes, in Ollama's Go-template terms,
what /api/generate does with a prompt and a suffix.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Any

from hearth.appliance.serving.capabilities import capabilities
from hearth.engine.prepare import ModelInfo

# The Ollama API level whose request and reply shapes /api follows; clients compare it with the
# least version they need (Copilot: 0.6.4). docs/clients.md says so.
OLLAMA_API_VERSION = "0.9.0"
_FAMILIES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}
_GGUF_TYPES = ("Q", "IQ", "F16", "F32", "BF16")
_NEVER = "9999-12-31T23:59:59Z"  # /api/ps expires_at: the model stays loaded
_STARTED = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def family(model: ModelInfo) -> str:
    """Ollama's architecture name: llama, qwen2, qwen3, ..."""
    architecture = model.architecture or "unknown"
    return _FAMILIES.get(architecture, architecture.removesuffix("ForCausalLM").lower())


def details(model: ModelInfo) -> dict[str, Any]:
    quantization = model.quantization or model.dtype.upper().replace("FLOAT", "F")
    is_gguf = quantization.upper().startswith(_GGUF_TYPES) and model.quantization is not None
    return {
        "parent_model": "",
        "format": "gguf" if is_gguf else "safetensors",
        "family": family(model),
        "families": [family(model)],
        "parameter_size": _parameter_size(model.num_params),
        "quantization_level": quantization,
    }


def tags(model: ModelInfo, names: list[str]) -> dict[str, Any]:
    return {"models": [_entry(model, name) | {"modified_at": _STARTED} for name in names]}


def ps(model: ModelInfo, names: list[str]) -> dict[str, Any]:
    return {
        "models": [
            _entry(model, name)
            | {"expires_at": _NEVER, "size_vram": 0, "context_length": model.max_model_len}
            for name in names
        ]
    }


def show(model: ModelInfo, name: str) -> dict[str, Any]:
    arch = family(model)
    info: dict[str, Any] = {
        "general.architecture": arch,
        "general.basename": name,
        f"{arch}.context_length": model.max_model_len,
    }
    if model.num_params:
        info["general.parameter_count"] = model.num_params
    return {
        "license": "",
        "modelfile": "# served by Hearth from its model catalogue (models.toml); no Modelfile\n",
        "parameters": f"num_ctx {model.max_model_len}",
        "template": _template(model),
        "details": details(model),
        "model_info": info,
        "capabilities": capabilities(model),
        "modified_at": _STARTED,
    }


def version() -> dict[str, str]:
    return {"version": OLLAMA_API_VERSION}


def _entry(model: ModelInfo, name: str) -> dict[str, Any]:
    digest = hashlib.sha256(f"{name}\0{model.name}".encode()).hexdigest()
    return {"name": name, "model": name, "size": 0, "digest": digest, "details": details(model)}


def _template(model: ModelInfo) -> str:
    fim = model.fim
    if fim is None:
        return "{{ .Prompt }}"
    token = lambda i: model.tokenizer.decode([i], skip_special_tokens=False)  # noqa: E731
    middle = "" if fim.middle_id is None else token(fim.middle_id)
    prefix, suffix = token(fim.prefix_id), token(fim.suffix_id)
    if fim.order == "psm":
        fill = f"{prefix}{{{{ .Prompt }}}}{suffix}{{{{ .Suffix }}}}{middle}"
    elif fim.middle_id is None:
        fill = f"{suffix}{{{{ .Suffix }}}}{prefix}{{{{ .Prompt }}}}"
    else:
        fill = f"{prefix}{suffix}{{{{ .Suffix }}}}{middle}{{{{ .Prompt }}}}"
    return f"{{{{- if .Suffix }}}}{fill}{{{{- else }}}}{{{{ .Prompt }}}}{{{{- end }}}}"


def _parameter_size(num_params: int | None) -> str:
    if not num_params:
        return ""
    if num_params >= 1e9:
        return f"{num_params / 1e9:.1f}B"
    return f"{num_params / 1e6:.0f}M"
