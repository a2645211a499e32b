"""ModelConfig: the shape of a model, read from an HF config.json or from GGUF metadata.

One plain dataclass so that models and the runner never touch a transformers config object.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hearth.engine.quantization.config import QuantConfig

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                           "Qwen3ForCausalLM")


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
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF rope_scaling / rope_parameters (e.g. llama3), or None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    torch_dtype: str | None = None  # the checkpoint's dtype name, e.g. "bfloat16"
    quantization: QuantConfig | None = None  # quantized linear weights (None: float checkpoint)

    def __post_init__(self) -> None:
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
        """Weights of the decoder layers' projections (q, k, v, o, gate, up, down): what a
        quantized checkpoint packs."""
        h, i = self.hidden_size, self.intermediate_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        return self.num_layers * (h * (q + 2 * kv) + q * h + 3 * h * i)

    @property
    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        h, v = self.hidden_size, self.vocab_size
        head = 0 if self.tie_word_embeddings else v * h
        norms = self.num_layers * 2 * h + h
        return v * h + self.num_linear_params + norms + head

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes
