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

from hearth.engine.model_config import SUPPORTED_ARCHITECTURES, ModelConfig
from hearth.engine.quantization.config import parse_quantization_config
from hearth.engine.rope_config import RopeConfig, rope_from_hf

_INDEX_FILE = "model.safetensors.index.json"


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
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
        qk_norm=arch == "Qwen3ForCausalLM",
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


def _max_positions(cfg: dict, rope: RopeConfig) -> int:
    """max_position_embeddings, capped by a sliding window; dynamic NTK scaling extends it.

    Attention over a window of W tokens is full attention for sequences no longer than W, so a
    sliding-window model (Mistral 7B v0.1) runs exactly, with its context capped at W.
    """
    max_positions = cfg.get("max_position_embeddings", 2048)
    if rope.kind == "dynamic":
        max_positions = int(max_positions * rope.factor)
    window = cfg.get("sliding_window")
    uses_window = cfg.get("use_sliding_window", True)  # Qwen2/3 configs carry the switch
    if window and uses_window and window < max_positions:
        return int(window)
    return int(max_positions)


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
