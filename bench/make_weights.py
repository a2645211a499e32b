"""Write a Hugging Face checkpoint directory of random weights for a bench config (e.g.
bench/configs/llama-3.1-8b): config.json, *.safetensors shards and a tiny word-level
tokenizer.json, so that `hearth serve --model DIR` loads real files from disk.

Why: `--load-format dummy` skips reading weights, so it cannot time a cold start, which reads the
checkpoint (issue 18, item 6: Llama-3-8B to its first token from a warm page cache). Nothing is
downloaded; the values are random (std 0.02, norms 1), drawn on the GPU when there is one.

    python bench/make_weights.py bench/configs/llama-3.1-8b /tmp/llama-8b [--shard-gib 4]

Llama-family names only (Llama, Mistral, Qwen2 without biases): the tensors transformers'
LlamaForCausalLM saves.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch


def llama_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Parameter name → shape, as LlamaForCausalLM names them."""
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    d = cfg.get("head_dim") or h // heads
    shapes = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (heads * d, h),
            p + "self_attn.k_proj.weight": (kv * d, h),
            p + "self_attn.v_proj.weight": (kv * d, h),
            p + "self_attn.o_proj.weight": (h, heads * d),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
    shapes["model.norm.weight"] = (h,)
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, h)
    return shapes


def write_tokenizer(dst: Path, cfg: dict) -> None:
    """A word-level vocabulary of a few words (ids below the model's vocabulary), enough to send
    text prompts; its EOS is the config's first."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "hello", "world", "the", "a", "code", "is", "hi"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(dst / "tokenizer.json"))
    eos = cfg.get("eos_token_id")
    (dst / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))


def main() -> None:
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--shard-gib", type=float, default=4.0)
    args = parser.parse_args()
    cfg = json.loads((args.config_dir / "config.json").read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copy(args.config_dir / "config.json", args.out / "config.json")
    write_tokenizer(args.out, cfg)
    dtype = getattr(torch, args.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device).manual_seed(0)
    limit = int(args.shard_gib * 2**30)
    shard: dict[str, torch.Tensor] = {}
    size, index, written, t0 = 0, {}, 0, time.perf_counter()

    def flush() -> None:
        nonlocal shard, size, written
        name = f"model-{len(set(index.values())) + 1:05d}.safetensors"
        save_file(shard, str(args.out / name), metadata={"format": "pt"})
        index.update({k: name for k in shard})
        written += size
        print(f"  {name}: {size / 2**30:.2f} GiB", flush=True)
        shard, size = {}, 0

    for name, shape in llama_shapes(cfg).items():
        if len(shape) == 1:
            t = torch.ones(shape, dtype=dtype)
        else:
            t = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * 0.02)
            t = t.to(dtype).cpu()
        shard[name] = t
        size += t.numel() * t.element_size()
        if size >= limit:
            flush()
    if shard:
        flush()
    (args.out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": written}, "weight_map": index}, indent=1))
    print(f"wrote {written / 2**30:.2f} GiB to {args.out} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
