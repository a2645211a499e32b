"""A decode step of a plain Llama decoder in one native call, on a CPU (kernels/cpu_native.py).

At batch 1 the torch path of the default model is about 1,600 small ops a token, whose dispatch
costs more than their arithmetic; `hearth_decode` runs the same forward (norms, fused qkv,
rotary, the tokens' K/V into the paged cache, attention, o, SiLU-and-mul MLP, residuals, the
final norm) over the GGUF's Q4 rows (repacked at load), for every step of up to GEMV_MAX_ROWS
new tokens (decode, speculative verification, short prompts).
A sequence's numbers do not depend on the others in the step (the GEMVs prepare and multiply
each row alone), so a greedy answer does not change with other users' traffic.

Taken only where it computes what engine/models/llama.py would (up to float32 rounding and the
GEMVs' int16 inputs): a float32 CPU model whose decoder linears are GGUF Q4_0 / Q4_1 blocks kept
(GGUFLinear.native_rows), no biases, no q/k norms, full neox rotary, no sliding window or
soft-capping, RMSNorm, SiLU. The KV cache is float16 (model_builder picks it for this path, as
llama.cpp does: half the bytes attention reads) or float32. Steps of more than GEMV_MAX_ROWS new
tokens (prompts) keep the torch path, whose linears multiply the layer dequantized and whose
attention casts the float16 cache (engine/attention.py).
"""

from __future__ import annotations

import ctypes

import torch

from hearth.engine.attention import AttentionMetadata
from hearth.engine.layers.activation import silu_and_mul
from hearth.engine.layers.linear import GGUFLinear
from hearth.engine.layers.norm import RMSNorm
from hearth.kernels import cpu_native


class NativeDecoder:
    """Holds the per-layer pointers (weights now, KV caches when the runner's first step comes)
    and runs decode steps."""

    def __init__(self, model) -> None:
        c = model.config
        self.model = model
        first = model.layers[0].self_attn
        self.dims = cpu_native.Dims(
            hidden=c.hidden_size, intermediate=c.intermediate_size, num_heads=first.num_heads,
            num_kv_heads=first.num_kv_heads, head_dim=first.head_dim, block_size=0, kv_half=0,
            eps=model.layers[0].input_layernorm.eps, scale=first.scale)
        self.rotary = first.rotary
        self._caches: list | None = None  # the runner's KV list the pointers below address
        self._decode = cpu_native.load().hearth_decode  # looked up once, not every step
        self._layers = (cpu_native.Layer * len(model.layers))()
        for i, layer in enumerate(model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            entry = self._layers[i]
            for name, linear in (("qkv", attn.qkv_proj), ("o", attn.o_proj),
                                 ("gate_up", mlp.gate_up_proj), ("down", mlp.down_proj)):
                setattr(entry, name, linear.qweight.data_ptr())  # native rows
            entry.input_norm = layer.input_layernorm.weight.data_ptr()
            entry.post_norm = layer.post_attention_layernorm.weight.data_ptr()
        self.final_norm = model.norm.weight

    @staticmethod
    def build(model) -> NativeDecoder | None:
        """A decoder for `model`, or None where the native forward would not compute what the
        torch path computes (see the module docstring) or the library cannot be built."""
        if not _eligible(model) or not cpu_native.available():
            return None
        return NativeDecoder(model)

    def applies(self, meta: AttentionMetadata) -> bool:
        """Steps of up to GEMV_MAX_ROWS new tokens: decode, speculative verification, short
        prompts. Each token attends to its own sequence's positions up to itself."""
        return meta is not None and len(meta.seq_lens_cpu) > 0 and (
            sum(meta.query_lens_cpu) <= cpu_native.GEMV_MAX_ROWS)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches,
                 meta: AttentionMetadata) -> torch.Tensor:
        self._bind(kv_caches)
        res = self.model.embed(input_ids).contiguous()  # (tokens, hidden): becomes the output
        cos, sin = self.rotary.cos_sin(positions)  # (tokens, 1, head_dim) each
        cos, sin = cos.contiguous(), sin.contiguous()
        tables = meta.block_tables
        if meta.max_query_len == 1:  # decode: one token a sequence
            lens = meta.seq_lens_cpu
        else:  # several tokens of a sequence: each sees the positions up to its own
            counts = torch.tensor(meta.query_lens_cpu)
            tables = tables[torch.repeat_interleave(torch.arange(len(counts)), counts)]
            lens = [seq_len - q_len + 1 + j for q_len, seq_len
                    in zip(meta.query_lens_cpu, meta.seq_lens_cpu) for j in range(q_len)]
        if tables.dtype != torch.int32 or tables.stride(1) != 1:
            tables = tables.to(torch.int32).contiguous()
        lens = torch.tensor(lens, dtype=torch.int64)
        slots = meta.slot_mapping
        if slots.dtype != torch.int64 or not slots.is_contiguous():
            slots = slots.to(torch.int64).contiguous()
        self._decode(
            self._layers, len(self._layers), ctypes.byref(self.dims), self.final_norm.data_ptr(),
            res.data_ptr(), cos.data_ptr(), sin.data_ptr(), tables.data_ptr(), tables.stride(0),
            lens.data_ptr(), slots.data_ptr(), res.shape[0])
        return res

    def _bind(self, kv_caches) -> None:
        """Point the layers at the runner's KV tensors (the same tensors every step)."""
        if kv_caches is self._caches:  # the runner passes its one list every step
            return
        dtype = kv_caches[0].key.dtype
        for entry, cache in zip(self._layers, kv_caches, strict=True):
            key, value = cache.key, cache.value
            if (key.dtype not in (torch.float16, torch.float32) or key.dtype != dtype
                    or value.dtype != dtype or not key.is_contiguous()
                    or not value.is_contiguous()):
                raise ValueError("the native decode needs contiguous float16 or float32 KV "
                                 "caches, one dtype for every layer")
            entry.k_cache, entry.v_cache = key.data_ptr(), value.data_ptr()
        self.dims.block_size = kv_caches[0].key.shape[1]
        self.dims.kv_half = int(dtype == torch.float16)
        self._caches = kv_caches


def _eligible(model) -> bool:
    """The layers' side; the caller (LlamaForCausalLM.prepare_native_decode) checks that the
    model is the plain Llama class with dense MLPs."""
    if type(model.norm) is not RMSNorm:
        return False
    if model.embed_tokens.weight.dtype != torch.float32 or model.embed_tokens.weight.is_cuda:
        return False
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if (attn.q_norm is not None or attn.extra or attn.rotary is not model.rotary
                or attn.rotary.is_partial or mlp.act_and_mul is not silu_and_mul
                or type(layer.input_layernorm) is not RMSNorm
                or type(layer.post_attention_layernorm) is not RMSNorm
                or layer.input_layernorm.eps != model.layers[0].input_layernorm.eps):
            return False
        for linear in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
            if (not isinstance(linear, GGUFLinear) or not linear.native_rows
                    or linear.bias is not None):
                return False
    return model.norm.eps == model.layers[0].input_layernorm.eps
