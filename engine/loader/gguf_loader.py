"""GGUF files (llama.cpp): metadata → ModelConfig and Tokenizer, tensors → HF-named float32 tensors.

The file is memory-mapped by `gguf.GGUFReader`; `GGUFModel.weights()` dequantizes one tensor at a
time as the caller iterates, so loading never holds a second float32 copy of the whole model.

Two things undo llama.cpp's converter so the tensors equal the HF checkpoint's:
- names: `blk.N.attn_q.weight` → `model.layers.N.self_attn.q_proj.weight`, and so on;
- for the `llama` architecture, Q and K rows: the converter permutes each head's rows from HF's
  "rotate halves" layout to GGML's interleaved pairs; `_unpermute` inverts that exactly as
  transformers' GGUF loader does:

      HF rows of one head:   [x0 x1 ... x(d/2-1) | y0 y1 ... y(d/2-1)]
      GGUF rows of one head: [x0 y0 x1 y1 ... x(d/2-1) y(d/2-1)]
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hearth.engine.model_config import ModelConfig
from hearth.engine.quantization.config import QuantConfig
from hearth.engine.quantization.gguf_blocks import BLOCKS
from hearth.engine.tokenizer import Tokenizer

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Projections Hearth fuses: kept quantized only when every member has the same block type.
_FUSED = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
_GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GGUFModel:
    config: ModelConfig
    tokenizer: Tokenizer
    weights: Callable[[], Iterator[tuple[str, torch.Tensor]]]  # lazily, one tensor at a time
    quantization: str  # the most common type of the 2-D weights, e.g. "Q4_1"


def load_gguf(path: str | Path, keep_quantized: bool = False) -> GGUFModel:
    """Read a GGUF file's metadata and tensor index; weights are read on iteration.

    By default every tensor comes dequantized to float32. With `keep_quantized`, the decoder's
    linear weights in a block format Hearth runs (engine/quantization/gguf_blocks.py) come as raw
    blocks named `...q_proj.qweight` (uint8, one row per output), and config.quantization lists
    them; embeddings, norms and the rest still come as float32.
    """
    reader = _open(Path(path))
    metadata = {key: field.contents() for key, field in reader.fields.items()}
    tensor_names = [t.name for t in reader.tensors]
    config = _model_config(metadata, tensor_names, path)
    hf_names = {t.name: _hf_name(t.name, path) for t in reader.tensors}
    types = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) == 2)
    kept = _kept_quantized(reader, hf_names) if keep_quantized else {}
    if kept:
        config = dataclasses.replace(config, quantization=QuantConfig("gguf", gguf_types=kept))

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        for tensor in reader.tensors:
            name = hf_names[tensor.name]
            if name is None:
                continue
            if name.removesuffix(".weight") in kept:
                yield name.removesuffix(".weight") + ".qweight", _raw_blocks(tensor, name, config)
            else:
                yield name, _dequantize(tensor, name, config)

    return GGUFModel(
        config=config,
        tokenizer=Tokenizer.from_gguf_metadata(metadata),
        weights=weights,
        quantization=types.most_common(1)[0][0] if types else "F32",
    )


def _open(path: Path) -> Any:
    from gguf import GGUFReader  # the package is imported only when a GGUF is loaded

    if not path.is_file():
        raise ValueError(f"GGUF file {path} does not exist")
    with path.open("rb") as f:
        if f.read(4) != _GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors...
        raise ValueError(f"{path} is not a readable GGUF file ({e}); it may be truncated") from e


def _model_config(md: dict[str, Any], tensor_names: list[str], path: str | Path) -> ModelConfig:
    arch = md.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; "
            f"supported: {', '.join(_ARCHITECTURES)}"
        )
    if "rope_freqs.weight" in tensor_names or md.get(f"{arch}.rope.scaling.type", "none") != "none":
        raise ValueError(f"{path}: RoPE scaling in GGUF files is not supported yet")
    try:
        hidden, num_heads = md[f"{arch}.embedding_length"], md[f"{arch}.attention.head_count"]
        head_dim = md.get(f"{arch}.attention.key_length") or hidden // num_heads
        config = ModelConfig(
            architecture=_ARCHITECTURES[arch],
            vocab_size=len(md["tokenizer.ggml.tokens"]),
            hidden_size=hidden,
            intermediate_size=md[f"{arch}.feed_forward_length"],
            num_layers=md[f"{arch}.block_count"],
            num_heads=num_heads,
            num_kv_heads=md.get(f"{arch}.attention.head_count_kv") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(md[f"{arch}.attention.layer_norm_rms_epsilon"]),
            rope_theta=float(md.get(f"{arch}.rope.freq_base", 10000.0)),
            max_position_embeddings=md.get(f"{arch}.context_length", 2048),
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias=arch == "qwen2",
            qk_norm=arch == "qwen3",
            bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=_eos_ids(md),
            torch_dtype="float32",
        )
    except KeyError as e:
        raise ValueError(f"{path}: GGUF metadata lacks {e}") from e
    if md.get(f"{arch}.rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"{path}: partial rotary embeddings are not supported")
    return config


def _eos_ids(md: dict[str, Any]) -> tuple[int, ...]:
    ids = (md.get(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom"))
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def _hf_name(gguf_name: str, path: str | Path) -> str | None:
    if gguf_name in _TOP_LEVEL:
        return _TOP_LEVEL[gguf_name]
    match = _BLOCK_NAME.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_BLOCK[part]}.{kind}"
    raise ValueError(f"{path}: unexpected tensor {gguf_name!r} for a llama/qwen model")


def _dequantize(tensor: Any, hf_name: str, config: ModelConfig) -> torch.Tensor:
    from gguf.quants import dequantize

    array = dequantize(tensor.data, tensor.tensor_type)  # numpy shape = reversed GGUF shape = HF
    if array.dtype != np.float32 or not array.flags.writeable:
        array = np.array(array, dtype=np.float32)  # F32/F16 come back as read-only memmap views
    weight = torch.from_numpy(array)
    if config.architecture == "LlamaForCausalLM":
        if ".q_proj." in hf_name:
            weight = _unpermute(weight, config.num_heads)
        elif ".k_proj." in hf_name:
            weight = _unpermute(weight, config.num_kv_heads)
    return weight


def _kept_quantized(reader: Any, hf_names: dict[str, str | None]) -> dict[str, str]:
    """HF module name → block type, for the linears the model can hold in block format."""
    types = {}
    for tensor in reader.tensors:
        name = hf_names[tensor.name]
        if name and name.endswith("_proj.weight") and tensor.tensor_type.name in BLOCKS:
            types[name.removesuffix(".weight")] = tensor.tensor_type.name
    kept = {}
    for name, qtype in types.items():
        prefix, _, proj = name.rpartition(".")
        group = next(g for g in _FUSED if proj in g)
        if all(types.get(f"{prefix}.{member}") == qtype for member in group):
            kept[name] = qtype
    return kept


def _raw_blocks(tensor: Any, hf_name: str, config: ModelConfig) -> torch.Tensor:
    """The tensor's blocks as (rows, row_bytes) uint8, Q/K rows in HF order."""
    raw = torch.from_numpy(np.array(tensor.data, dtype=np.uint8))  # a copy: the file is read-only
    if config.architecture == "LlamaForCausalLM":
        if ".q_proj." in hf_name:
            raw = _unpermute(raw, config.num_heads)
        elif ".k_proj." in hf_name:
            raw = _unpermute(raw, config.num_kv_heads)
    return raw


def _unpermute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's `permute` of Q/K rows (see the module docstring)."""
    rows = weight.shape[0]
    half = rows // num_heads // 2
    w = weight.reshape(num_heads, half, 2, *weight.shape[1:])  # (heads, d/2, pair, ...)
    return w.transpose(1, 2).reshape(weight.shape).contiguous()  # (heads, pair, d/2, ...)
