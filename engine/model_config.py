"""ModelConfig: the shape of a model, read from an HF config.json or from GGUF metadata.

One plain dataclass so that models and the runner never touch a transformers config object.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hearth.engine.quantization.config import QuantConfig
from hearth.engine.rope_config import RopeConfig

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                           "Qwen3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
                           "Phi3ForCausalLM", "Qwen3MoeForCausalLM", "MixtralForCausalLM")
SLIDING, FULL = "sliding_attention", "full_attention"  # layer types, as transformers names them


@dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts MLP: a router picks `num_experts_per_tok` of `num_experts` per token."""

    num_experts: int
    num_experts_per_tok: int
    intermediate_size: int  # of one expert
    norm_topk_prob: bool = True  # renormalise the top-k weights to sum 1 (Mixtral always does)
    dense_layers: tuple[int, ...] = ()  # layers with a dense MLP instead (Qwen3-MoE mlp_only)

    def __post_init__(self) -> None:
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                             f"1..num_experts ({self.num_experts})")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # HF name, e.g. "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    max_position_embeddings: int = 2048
    # Sliding-window attention: a query at position p sees keys p - sliding_window < k <= p in
    # the layers whose type is SLIDING (every layer when layer_types is empty).
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    rope_local: RopeConfig | None = None  # Gemma 3: the RoPE of the sliding layers
    hidden_act: str = "silu"  # the gated MLP's activation: silu, or gelu_pytorch_tanh (Gemma)
    query_pre_attn_scalar: float | None = None  # Gemma: scores scaled by 1/sqrt(this)
    attn_logit_softcapping: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # Gemma 2: the same on the logits
    moe: MoEConfig | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    torch_dtype: str | None = None  # the checkpoint's dtype name, e.g. "bfloat16"
    quantization: QuantConfig | None = None  # quantized linear weights (None: float checkpoint)

    @property
    def rope_theta(self) -> float:
        return self.rope.theta

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of `layer`, None where it attends to the whole context."""
        if self.sliding_window is None:
            return None
        if self.layer_types and self.layer_types[layer] != SLIDING:
            return None
        return self.sliding_window

    @property
    def kv_window(self) -> int | None:
        """The window every layer keeps: K/V older than it are needed by no layer (None: some
        layer attends to everything, so nothing may be dropped)."""
        windows = {self.layer_window(i) for i in range(self.num_layers)}
        return None if None in windows else max(windows)

    def __post_init__(self) -> None:
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types names {len(self.layer_types)} layers, the model has "
                             f"{self.num_layers}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )

    @property
    def num_linear_params(self) -> int:
        """Weights of the decoder layers' projections (q, k, v, o, gate, up, down; every expert
        and the routers of MoE layers): what a quantized checkpoint packs."""
        return self.num_layers * self._attention_params() + self._mlp_params(active=False)

    @property
    def num_active_params(self) -> int:
        """Weights one decode step of one token reads: the layers' projections (MoE layers: the
        router and the k routed experts only) and the output head (tied or not; the embedding
        lookup reads one row)."""
        return (self.num_layers * self._attention_params() + self._mlp_params(active=True)
                + self.vocab_size * self.hidden_size)

    @property
    def num_expert_params(self) -> int:
        """Weights of the routed experts of every MoE layer (0 for a dense model)."""
        if self.moe is None:
            return 0
        sparse_layers = self.num_layers - len(self.moe.dense_layers)
        return (sparse_layers * self.moe.num_experts * 3 * self.hidden_size
                * self.moe.intermediate_size)

    def _attention_params(self) -> int:
        h, q = self.hidden_size, self.num_heads * self.head_dim
        return h * (q + 2 * self.num_kv_heads * self.head_dim) + q * h

    def _mlp_params(self, active: bool) -> int:
        h, moe = self.hidden_size, self.moe
        dense = 3 * h * self.intermediate_size
        if moe is None:
            return self.num_layers * dense
        experts = moe.num_experts_per_tok if active else moe.num_experts
        sparse = experts * 3 * h * moe.intermediate_size + h * moe.num_experts
        num_dense = len(moe.dense_layers)
        return num_dense * dense + (self.num_layers - num_dense) * sparse

    @property
    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        h, v = self.hidden_size, self.vocab_size
        head = 0 if self.tie_word_embeddings else v * h
        norms_a_layer = (4 if self.architecture.startswith("Gemma") else 2) * h
        norms = self.num_layers * (norms_a_layer + 2 * self.head_dim * self.qk_norm) + h
        return v * h + self.num_linear_params + norms + head

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes
