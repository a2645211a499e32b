"""Hugging Face checkpoint directories: config.json → ModelConfig, *.safetensors → named tensors.

Tensors keep their HF names and the checkpoint's dtype. Files are checked before any tensor is
read (every shard present, every header readable) so a broken download fails at once, naming the
file, rather than halfway through building the model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from hearth.engine.model_config import (
    FULL,
    SLIDING,
    SUPPORTED_ARCHITECTURES,
    ModelConfig,
    MoEConfig,
)
from hearth.engine.quantization.config import parse_quantization_config
from hearth.engine.rope_config import RopeConfig, rope_from_hf

_INDEX_FILE = "model.safetensors.index.json"
_QWEN = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
_QK_NORM = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForCausalLM")


def load_hf_config(model_dir: str | Path) -> ModelConfig:
    """The model's shape from config.json (and its stop ids from generation_config.json)."""
    model_dir = _check_dir(model_dir)
    cfg = _read_json(model_dir / "config.json")
    arch = _architecture(cfg, model_dir)
    try:
        return _model_config(cfg, arch, model_dir)
    except KeyError as e:
        raise ValueError(f"{model_dir / 'config.json'} lacks the key {e}") from e


def _model_config(cfg: dict, arch: str, model_dir: Path) -> ModelConfig:
    num_heads = cfg["num_attention_heads"]
    rope = rope_config(cfg)
    generation = _read_json(model_dir / "generation_config.json", required=False)
    eos_ids = _id_list(cfg.get("eos_token_id")) + _id_list(generation.get("eos_token_id"))
    if cfg.get("mlp_bias"):
        raise ValueError(f"{model_dir}: mlp_bias=true is not supported")
    window, layer_types = _sliding_window(cfg, arch)
    return ModelConfig(
        architecture=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope=rope,
        max_position_embeddings=_max_positions(cfg, rope),
        sliding_window=window,
        layer_types=layer_types,
        rope_local=_local_rope(cfg, arch),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
        qk_norm=arch in _QK_NORM,
        hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu",
        query_pre_attn_scalar=cfg.get("query_pre_attn_scalar"),
        attn_logit_softcapping=cfg.get("attn_logit_softcapping"),
        final_logit_softcapping=cfg.get("final_logit_softcapping"),
        moe=_moe(cfg, arch),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(eos_ids)),
        torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
        quantization=parse_quantization_config(cfg, str(model_dir / "config.json")),
    )


def iter_hf_weights(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every tensor in the directory's safetensors files.

    The files are validated now; the tensors are read lazily, one at a time, as the caller iterates.
    """
    files = _safetensors_files(_check_dir(model_dir))
    for path in files:
        _open(path).keys()  # parses the header; raises a ValueError naming a corrupt file
    return _iter_tensors(files)


def _iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        with _open(path) as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq"):  # a buffer some old checkpoints saved
                    continue
                yield name, f.get_tensor(name)


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / _INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"{model_dir} has no *.safetensors files; Hearth loads safetensors only "
            "(convert .bin checkpoints with transformers' save_pretrained(safe_serialization=True))"
        )
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"{model_dir} is missing weight files: {', '.join(missing)}")
    return files


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # SafetensorError is not exported under a stable name
        raise ValueError(
            f"{path} is not a readable safetensors file ({e}); the download may be incomplete"
        ) from e


def _check_dir(model_dir: str | Path) -> Path:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"model directory {model_dir} does not exist")
    if not (model_dir / "config.json").is_file():
        raise ValueError(
            f"{model_dir} has no config.json; expected a Hugging Face model directory "
            "(config.json, tokenizer.json, *.safetensors)"
        )
    return model_dir


def _architecture(cfg: dict, model_dir: Path) -> str:
    archs = cfg.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    raise ValueError(
        f"{model_dir}: architecture {archs or cfg.get('model_type')!r} is not supported; "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def rope_config(cfg: dict, layer_type: str = "full_attention") -> RopeConfig:
    """The RoPE of one layer type: rope_parameters (transformers 5, possibly one dict per layer
    type) or rope_scaling + rope_theta (transformers 4)."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    if isinstance(params, dict) and isinstance(params.get(layer_type), dict):
        params = params[layer_type]  # nested per layer type (Gemma 3 in transformers 5)
    return rope_from_hf(params, cfg)


def _local_rope(cfg: dict, arch: str) -> RopeConfig | None:
    """Gemma 3's sliding layers: their own rope_parameters entry (transformers 5), or theta
    rope_local_base_freq, unscaled (transformers 4)."""
    if arch != "Gemma3ForCausalLM":
        return None
    params = cfg.get("rope_parameters") or {}
    if isinstance(params.get(SLIDING), dict):
        return rope_config(cfg, SLIDING)
    return RopeConfig(theta=float(cfg.get("rope_local_base_freq") or 10000.0))


def _sliding_window(cfg: dict, arch: str) -> tuple[int | None, tuple[str, ...]]:
    """(window, layer types), as transformers reads them: `layer_types` when the config lists
    them, else Gemma 2's alternation, Gemma 3's `sliding_window_pattern`, Qwen's switch
    (use_sliding_window, from max_window_layers on), or every layer (Mistral, Phi-3)."""
    window = cfg.get("sliding_window")
    n = cfg["num_hidden_layers"]
    if not window or (arch in _QWEN and not cfg.get("use_sliding_window", False)):
        return None, ()
    types = cfg.get("layer_types")
    if not types and arch == "Gemma2ForCausalLM":
        types = [SLIDING if (i + 1) % 2 else FULL for i in range(n)]
    elif not types and arch == "Gemma3ForCausalLM":
        pattern = cfg.get("sliding_window_pattern") or 6
        types = [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
    elif not types and arch in _QWEN:
        first = cfg.get("max_window_layers") or 0
        types = [SLIDING if i >= first else FULL for i in range(n)]
    types = tuple(types or ())
    if types and SLIDING not in types:
        return None, ()
    return int(window), types


def _max_positions(cfg: dict, rope: RopeConfig) -> int:
    """max_position_embeddings; dynamic NTK scaling extends it."""
    max_positions = cfg.get("max_position_embeddings", 2048)
    if rope.kind == "dynamic":
        max_positions = int(max_positions * rope.factor)
    return int(max_positions)


def _moe(cfg: dict, arch: str) -> MoEConfig | None:
    """Qwen3-MoE (num_experts, moe_intermediate_size, norm_topk_prob, dense layers) and
    Mixtral (num_local_experts, intermediate_size, always renormalised)."""
    if arch == "MixtralForCausalLM":
        return MoEConfig(cfg["num_local_experts"], cfg["num_experts_per_tok"],
                         cfg["intermediate_size"], norm_topk_prob=True)
    if arch != "Qwen3MoeForCausalLM":
        return None
    step = cfg.get("decoder_sparse_step") or 1
    only = set(cfg.get("mlp_only_layers") or ())
    dense = tuple(i for i in range(cfg["num_hidden_layers"]) if i in only or (i + 1) % step)
    num_experts = cfg.get("num_experts") or cfg["num_local_experts"]  # transformers 5.25 names
    return MoEConfig(num_experts, cfg["num_experts_per_tok"],
                     cfg["moe_intermediate_size"],
                     norm_topk_prob=bool(cfg.get("norm_topk_prob", False)), dense_layers=dense)


def _read_json(path: Path, required: bool = True) -> dict:
    if not path.is_file():
        if required:
            raise ValueError(f"{path} does not exist")
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def _id_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]
