"""GGUF files (llama.cpp): metadata → ModelConfig and Tokenizer, tensors → HF-named float32 tensors.

The file is memory-mapped and its header parsed by engine/loader/gguf_file.py;
`GGUFModel.weights()` dequantizes one tensor at a time as the caller iterates, so loading never
holds a second float32 copy of the whole model. The block types Hearth runs (Q4_0, Q4_1, Q8_0,
Q4_K, Q6_K) dequantize with engine/quantization/gguf_blocks.py's torch code, which gives gguf-py's
numbers exactly in half its time; the rest with gguf-py's.

What the converter changed is undone so the tensors equal the HF checkpoint's:
- names (engine/loader/gguf_names.py): `blk.N.attn_q.weight` →
  `model.layers.N.self_attn.q_proj.weight`, and so on; metadata in engine/loader/gguf_config.py;
- Gemma's norms, stored as (1 + w): w;
- for the `llama` architecture, Q and K rows: the converter permutes each head's rows from HF's
  "rotate halves" layout to GGML's interleaved pairs; `_unpermute` inverts that exactly as
  transformers' GGUF loader does:

      HF rows of one head:   [x0 x1 ... x(d/2-1) | y0 y1 ... y(d/2-1)]
      GGUF rows of one head: [x0 y0 x1 y1 ... x(d/2-1) y(d/2-1)]
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hearth.engine.loader.gguf_config import gguf_model_config
from hearth.engine.loader.gguf_file import read_gguf
from hearth.engine.loader.gguf_names import hf_name
from hearth.engine.model_config import ModelConfig
from hearth.engine.quantization.config import QuantConfig
from hearth.engine.quantization.gguf_blocks import BLOCKS
from hearth.engine.quantization.gguf_blocks import dequantize as dequantize_blocks
from hearth.engine.tokenizer import Tokenizer

# Projections Hearth fuses: kept quantized only when every member has the same block type.
_FUSED = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",),
          ("qkv_proj",), ("gate_up_proj",))
# llama.cpp permutes Q/K rows for its `llama` architecture only (Llama, Mistral, Mixtral)
_PERMUTED = ("LlamaForCausalLM", "MixtralForCausalLM")


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
    reader = read_gguf(path)
    metadata = reader.metadata
    config = gguf_model_config(metadata, {t.name: t for t in reader.tensors}, path)
    arch = metadata["general.architecture"]
    hf_names = {t.name: hf_name(t.name, arch, path) for t in reader.tensors}
    types = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) == 2)
    kept = _kept_quantized(reader, hf_names) if keep_quantized else {}
    if kept:
        by_name = {t.name: t for t in reader.tensors}
        head = by_name.get("output.weight", by_name.get("token_embd.weight"))
        head_type = head.tensor_type.name if head is not None else None
        config = dataclasses.replace(config, quantization=QuantConfig(
            "gguf", gguf_types=kept, lm_head_type=head_type))

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


def _dequantize(tensor: Any, hf_name: str, config: ModelConfig) -> torch.Tensor:
    qtype = tensor.tensor_type.name
    if qtype in BLOCKS:  # torch's dequantizers: gguf-py's numbers exactly (a test checks)
        raw = torch.from_numpy(np.array(tensor.data))  # a copy: the file's map is read-only
        cols = tensor.shape[0]
        weight = dequantize_blocks(raw.reshape(-1, raw.shape[-1]), qtype, cols)
        weight = weight.reshape(*raw.shape[:-1], cols)
    else:
        from gguf.quants import dequantize

        array = dequantize(tensor.data, tensor.tensor_type)  # numpy shape = reversed GGUF's = HF
        if array.dtype != np.float32 or not array.flags.writeable:
            array = np.array(array, dtype=np.float32)  # F32/F16 come back as read-only views
        weight = torch.from_numpy(array)
    if config.architecture.startswith("Gemma") and hf_name.endswith("norm.weight"):
        # the converter stored Gemma's (1 + w): w again, exactly (Sterbenz), the model adds 1
        weight = weight - 1.0
    if config.architecture in _PERMUTED:
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
        if (name and name.endswith("_proj.weight") and ".experts." not in name
                and tensor.tensor_type.name in BLOCKS):  # experts come dequantized
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
    if config.architecture in _PERMUTED:
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
