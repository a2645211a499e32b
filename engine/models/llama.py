"""Llama-family decoder (Llama 2/3, Mistral, SmolLM2) over flat paged batches, and the pieces the
other families reuse (engine/models/: qwen, gemma, phi3, moe).

Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm) are the same network with two switches read
from ModelConfig; engine/models/qwen.py names them. Projections are fused (qkv, gate_up) so each
layer runs two matmuls where the checkpoint has five; `load_weights` maps HF names onto the slices.
Per layer, Attention reads its sliding window (ModelConfig.layer_window), its query scale
(query_pre_attn_scalar) and score soft-capping from the config.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from hearth.engine.attention import AttentionMetadata
from hearth.engine.layers.activation import gated_activation
from hearth.engine.layers.linear import QuantizedLinear, make_linear
from hearth.engine.layers.norm import RMSNorm
from hearth.engine.layers.rotary import RotaryEmbedding
from hearth.engine.model_config import ModelConfig
from hearth.engine.quantization import cpu_int8
from hearth.kernels import cpu_native

KVCache = tuple[torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, prefix: str, layer: int = 0,
                 norm: type[RMSNorm] = RMSNorm, fused_checkpoint: bool = False) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        h = config.hidden_size
        quant, qkv = config.quantization, tuple(f"{prefix}.{p}_proj" for p in "qkv")
        if fused_checkpoint:  # Phi-3 stores qkv_proj itself
            qkv = (f"{prefix}.qkv_proj",)
        self.qkv_proj = make_linear(h, self.q_size + 2 * self.kv_size, config.attention_bias,
                                    quant, qkv)
        self.o_proj = make_linear(self.q_size, h, False, quant, (f"{prefix}.o_proj",))
        self.q_norm = norm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = norm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.rotary = rotary
        self.scale = (config.query_pre_attn_scalar or self.head_dim) ** -0.5
        # only what a layer uses reaches the backend (plain layers call it as before)
        window, softcap = config.layer_window(layer), config.attn_logit_softcapping
        self.extra = {k: v for k, v in (("window", window), ("softcap", softcap)) if v}

    def forward(self, positions, hidden, kv_cache: KVCache, meta: AttentionMetadata, backend):
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        # Triton: rotary in the attention backend (its kernels rotate whole heads only)
        rotates = backend.rotates and not self.rotary.is_partial
        if self.q_norm is None and not qkv.is_cuda and not rotates:  # CPU: q, k in one pass
            heads = self.num_heads + self.num_kv_heads
            qk = self.rotary.rotate(positions, qkv[:, : self.q_size + self.kv_size].view(
                -1, heads, self.head_dim))
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        else:
            q = q.view(-1, self.num_heads, self.head_dim)  # (num_tokens, num_heads, head_dim)
            k = k.view(-1, self.num_kv_heads, self.head_dim)  # (num_tokens, kv_heads, head_dim)
            if self.q_norm is not None:
                if qkv.is_cuda:  # one launch, in place on qkv, which q and k view
                    from hearth.kernels.fused import qk_rms_norm_

                    qk_rms_norm_(qkv, self.num_heads, self.num_kv_heads, self.head_dim,
                                 self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
                else:
                    q, k = self.q_norm(q), self.k_norm(k)
            if not rotates:
                q, k = self.rotary(positions, q, k)
        rope = {"rope": (positions, self.rotary.cos_sin_cache)} if rotates else {}
        out = backend.forward(q, k, v, kv_cache, meta, self.scale, **rope, **self.extra)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, prefix: str, fused_checkpoint: bool = False) -> None:
        super().__init__()
        h, i, quant = config.hidden_size, config.intermediate_size, config.quantization
        gate_up = (f"{prefix}.gate_proj", f"{prefix}.up_proj")
        if fused_checkpoint:
            gate_up = (f"{prefix}.gate_up_proj",)
        self.gate_up_proj = make_linear(h, 2 * i, False, quant, gate_up)
        self.down_proj = make_linear(i, h, False, quant, (f"{prefix}.down_proj",))
        self.act_and_mul = gated_activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, prefix: str,
                 layer: int = 0, fused_checkpoint: bool = False) -> None:
        super().__init__()
        self.self_attn = Attention(config, rotary, f"{prefix}.self_attn", layer,
                                   fused_checkpoint=fused_checkpoint)
        self.mlp = make_mlp(config, prefix, layer, fused_checkpoint)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual, kv_cache, meta, backend):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, meta, backend)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


def make_mlp(config: ModelConfig, prefix: str, layer: int,
             fused_checkpoint: bool = False) -> nn.Module:
    """The layer's MLP: dense, or a mixture of experts (engine/models/moe.py)."""
    if config.moe is not None and layer not in config.moe.dense_layers:
        from hearth.engine.models.moe import MoEBlock

        return MoEBlock(config, f"{prefix}.mlp")
    return MLP(config, f"{prefix}.mlp", fused_checkpoint)


class LlamaForCausalLM(nn.Module):
    norm_class: type[RMSNorm] = RMSNorm

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.make_rotaries()
        # `_weight`: no random init. On the builder's meta device nn.Embedding's normal_ runs
        # torch's Python decompositions, which import torch._dynamo (1.3 s of a cold start);
        # load_weights or init_dummy fills it.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(self.make_layer(i) for i in range(config.num_layers))
        self.norm = self.norm_class(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head_int8: cpu_int8.Int8Rows | None = None  # CPU decode, see prepare_cpu_head
        self.native_decoder = None  # CPU steps of few tokens in one native call (see below)
        self._head_kernel = None  # the int8 head's kernel when not torch's (prepare_cpu_head)
        self.tie_weights()

    def make_rotaries(self) -> None:
        c = self.config
        self.rotary = RotaryEmbedding(c.head_dim, c.max_position_embeddings, c.rope)  # shared

    def make_layer(self, layer: int) -> nn.Module:
        return DecoderLayer(self.config, self.rotary, f"model.layers.{layer}", layer)

    def rotaries(self) -> list[RotaryEmbedding]:
        return [self.rotary]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # (num_tokens,)
        positions: torch.Tensor,  # (num_tokens,)
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
        backend,
    ) -> torch.Tensor:
        if self.native_decoder is not None and self.native_decoder.applies(meta):
            return self.native_decoder(input_ids, positions, kv_caches, meta)
        hidden, residual = self.embed(input_ids), None
        for rotary in self.rotaries():
            rotary.prepare(positions, hidden.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta, backend)
        hidden, _ = self.norm(hidden, residual)
        return hidden  # (num_tokens, hidden_size)

    def prepare_cpu_head(self, gemv_dtype: torch.dtype | None = None,
                         native: bool = False) -> bool:
        """On a CPU with 16-bit activations (or a 16-bit `gemv_dtype` under float32 ones,
        EngineConfig.cpu_bf16_gemv) and a GGUF head of 8 bits or fewer, an int8 copy of the LM
        head for decode's few rows (engine/quantization/cpu_int8.py). `native` (a float32 model
        with the native CPU kernels): the same int8 rows through kernels/cpu_native.py."""
        weight = self.lm_head.weight
        quant = self.config.quantization
        if weight.device.type != "cpu" or quant is None:
            return False
        if (native and weight.dtype == torch.float32  # (bf16: asks only "8 bits or fewer?")
                and cpu_int8.supported(quant.lm_head_type, torch.bfloat16)
                and weight.shape[1] % cpu_native.BLOCK == 0):
            self.lm_head_int8 = cpu_int8.quantize_rows(weight.data, dtype=torch.float32)
            self._head_kernel = cpu_native.i8_logits
            return True
        dtype = gemv_dtype or weight.dtype
        if not cpu_int8.supported(quant.lm_head_type, dtype):
            return False
        self.lm_head_int8 = cpu_int8.quantize_rows(weight.data, dtype=dtype)
        return True

    def prepare_native_decode(self) -> bool:
        """After the weights: CPU steps of up to 32 new tokens (decode, verification, short
        prompts) in one native call where this model takes it (engine/models/native_decode.py)."""
        from hearth.engine.models.native_decode import NativeDecoder

        plain = type(self) is LlamaForCausalLM and all(type(layer.mlp) is MLP
                                                       for layer in self.layers)
        self.native_decoder = NativeDecoder.build(self) if plain else None
        return self.native_decoder is not None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head_int8 is not None and hidden.shape[0] <= cpu_int8.MAX_ROWS:
            if self._head_kernel is not None:  # the same logits in one native call
                head = self.lm_head_int8
                return self._head_kernel(hidden, head.weight, head.exact_scales, cpu_int8.REFINED)
            return cpu_int8.logits(hidden, self.lm_head_int8)
        weight = self.lm_head.weight
        if hidden.shape[0] == 1 and not hidden.is_cuda and weight.dtype != torch.float32:
            # one row in bf16/fp16 on CPU: torch.mv's kernel reads the (vocab, hidden) weight
            # about 1.7x faster than F.linear's GEMM path (float32 stays on F.linear: exact path)
            return torch.mv(weight, hidden[0]).unsqueeze(0)
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the fused parameters; every parameter must be covered."""
        params = dict(self.named_parameters())
        quantized = {n: m for n, m in self.named_modules() if isinstance(m, QuantizedLinear)}
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            special = self.load_special(hf_name, tensor)
            if special is not None:
                loaded.add(special)
                continue
            target = self.map_name(hf_name)
            if target is None:
                continue
            name, offset = target
            module_name, _, attr = name.rpartition(".")
            if module_name in quantized and attr != "bias":
                quantized[module_name].load(attr, tensor, offset)
                continue
            if name not in params:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no place in a "
                                 f"{self.config.architecture} model; it loads "
                                 f"{', '.join(_name_patterns(params))}")
            param = params[name]
            dst = param.data if offset is None else param.data.narrow(0, *offset)
            if dst.shape != tensor.shape:
                raise ValueError(
                    f"checkpoint tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(dst.shape)}"
                )
            dst.copy_(tensor)
            loaded.add(name)
        self._check_all_loaded(params, loaded)
        for module in quantized.values():
            module.finalize()

    def map_name(self, hf_name: str) -> tuple[str, tuple[int, int] | None] | None:
        """HF checkpoint name -> (parameter name, (row offset, rows) or None); None: skip it."""
        return _map_name(hf_name, self.config)

    def load_special(self, hf_name: str, tensor: torch.Tensor) -> str | None:
        """A family's own loading of one tensor (Gemma's norms, experts): the parameter it
        filled, or None to load it the plain way."""
        return None

    def _check_all_loaded(self, params: dict, loaded: set[str]) -> None:
        missing = [n for n in params if n not in loaded]
        if self.config.tie_word_embeddings:
            missing = [n for n in missing if n != "lm_head.weight"]
        if missing:
            raise ValueError(f"checkpoint is missing weights: {', '.join(missing[:5])}")

    def init_dummy(self, seed: int) -> None:
        """Random weights (load_format="dummy"): same compute as real weights, for benchmarks."""
        device = self.embed_tokens.weight.device
        gen = torch.Generator(device=device).manual_seed(seed)
        quantized_names = {n for n, m in self.named_modules() if isinstance(m, QuantizedLinear)}
        for module in self.modules():
            if isinstance(module, QuantizedLinear):
                module.init_dummy(gen)
        for name, param in self.named_parameters():
            if name.endswith(".bias") and name.rpartition(".")[0] in quantized_names:
                continue
            if "norm" in name:
                param.data.fill_(1.0)
            else:
                param.data.normal_(0.0, 0.02, generator=gen)


def _map_name(hf_name: str, config: ModelConfig) -> tuple[str, tuple[int, int] | None] | None:
    """HF checkpoint name -> (our parameter name, (row offset, rows) slice or None)."""
    if "rotary_emb.inv_freq" in hf_name:
        return None
    if config.tie_word_embeddings and hf_name == "lm_head.weight":
        return None  # the same tensor as the embedding
    name = hf_name.removeprefix("model.")
    q = config.num_heads * config.head_dim
    kv = config.num_kv_heads * config.head_dim
    i = config.intermediate_size
    fused = {
        "self_attn.q_proj": ("self_attn.qkv_proj", (0, q)),
        "self_attn.k_proj": ("self_attn.qkv_proj", (q, kv)),
        "self_attn.v_proj": ("self_attn.qkv_proj", (q + kv, kv)),
        "mlp.gate_proj": ("mlp.gate_up_proj", (0, i)),
        "mlp.up_proj": ("mlp.gate_up_proj", (i, i)),
    }
    for src, (dst, offset) in fused.items():
        if f".{src}." in name:
            return name.replace(src, dst), offset
    return name, None


def _name_patterns(params: dict) -> list[str]:
    """The parameters as checkpoint-style names, layers folded: model.layers.N.mlp.down_proj..."""
    return sorted({"model." + re.sub(r"\.\d+\.", ".N.", name) for name in params})
